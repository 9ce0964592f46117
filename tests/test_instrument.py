"""instrument()/uninstrument(): plain executors, threads, timers and run_in_executor propagate context."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import json
import multiprocessing
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import wrapt
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import child_env, run_child

import ctxprop
from ctxprop import _capture
from ctxprop._instrument import is_instrumented
from ctxprop._otel_instrumentor import CtxpropInstrumentor

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

ORIGINALS = {
    "submit": ThreadPoolExecutor.submit,
    "process_submit": ProcessPoolExecutor.submit,
    "start": threading.Thread.start,
    "run_in_executor": asyncio.base_events.BaseEventLoop.run_in_executor,
}


@pytest.fixture(autouse=True)
def _uninstrument_after() -> Iterator[None]:
    """Every test leaves the standard library unpatched."""
    yield
    ctxprop.uninstrument()


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    """A pipeline exporting to memory."""
    exp = InMemorySpanExporter()
    ctxprop.init(exporter=exp, service_name="instrument-test")
    return exp


def finished(exp: InMemorySpanExporter) -> list[ReadableSpan]:
    assert ctxprop.flush(30)
    return list(exp.get_finished_spans())


def tags_here() -> dict[str, Any]:
    return {**ctxprop.get_isolation_scope().tags, **ctxprop.get_current_scope().tags}


def test_uninstrument_restores_the_original_functions() -> None:
    """After instrument() then uninstrument(), the patched attributes are the originals (``is``)."""
    ctxprop.instrument()
    assert isinstance(ThreadPoolExecutor.__dict__["submit"], wrapt.FunctionWrapper)
    assert isinstance(threading.Thread.__dict__["start"], wrapt.FunctionWrapper)
    assert is_instrumented()
    ctxprop.uninstrument()
    assert ThreadPoolExecutor.submit is ORIGINALS["submit"]
    assert threading.Thread.start is ORIGINALS["start"]
    assert ProcessPoolExecutor.submit is ORIGINALS["process_submit"]
    assert asyncio.base_events.BaseEventLoop.run_in_executor is ORIGINALS["run_in_executor"]
    assert not is_instrumented()
    ctxprop.uninstrument()  # a second undo is a no-op
    assert ThreadPoolExecutor.submit is ORIGINALS["submit"]


def test_instrument_is_idempotent_and_thread_safe() -> None:
    """instrument() from many threads at once, and repeatedly, wraps each function exactly once."""
    barrier = threading.Barrier(8)

    def go() -> None:
        barrier.wait()
        ctxprop.instrument()

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ctxprop.instrument()
    assert ThreadPoolExecutor.__dict__["submit"].__wrapped__ is ORIGINALS["submit"]
    assert threading.Thread.__dict__["start"].__wrapped__ is ORIGINALS["start"]
    ctxprop.uninstrument()
    assert ThreadPoolExecutor.submit is ORIGINALS["submit"]


def test_plain_pool_without_instrument_loses_the_context() -> None:
    """Control: a plain ThreadPoolExecutor does not carry tags or ContextVars unless instrumented."""
    with ctxprop.isolation_scope(), ThreadPoolExecutor(max_workers=1) as pool:
        ctxprop.set_tag("job", "nightly")
        REQUEST_ID.set("r-1")
        assert pool.submit(lambda: (tags_here(), REQUEST_ID.get())).result() == ({}, "-")


def test_plain_pool_submit_and_map_propagate() -> None:
    """Under instrument(), plain submit and map see the submitter's tags and ContextVars; nothing leaks."""
    ctxprop.instrument()
    with ThreadPoolExecutor(max_workers=2) as pool:
        with ctxprop.isolation_scope():
            ctxprop.set_tag("job", "nightly")
            token = REQUEST_ID.set("r-1")

            def task(i: int) -> tuple[dict[str, Any], str]:
                seen = (tags_here(), REQUEST_ID.get())
                ctxprop.set_tag("leak", i)
                REQUEST_ID.set("mutated")
                return seen

            assert pool.submit(task, 0).result() == ({"job": "nightly"}, "r-1")
            assert list(pool.map(task, range(4))) == [({"job": "nightly"}, "r-1")] * 4
            assert tags_here() == {"job": "nightly"}
            assert REQUEST_ID.get() == "r-1"
            REQUEST_ID.reset(token)
        # a later task from a context without tags sees none of the earlier ones
        assert contextvars.Context().run(lambda: pool.submit(task, 9).result()) == ({}, "-")


def test_pool_worker_threads_do_not_inherit_the_first_submitter() -> None:
    """A pool's worker thread is started by the first submit; its initializer and later tasks stay clean."""
    ctxprop.instrument()
    init_seen: queue.Queue[tuple[dict[str, Any], str]] = queue.Queue()
    pool = ThreadPoolExecutor(
        max_workers=1, initializer=lambda: init_seen.put((tags_here(), REQUEST_ID.get()))
    )
    try:

        def first() -> None:
            ctxprop.set_tag("first", True)
            REQUEST_ID.set("first-submitter")
            pool.submit(int).result()

        contextvars.Context().run(first)
        assert init_seen.get(timeout=30) == ({}, "-")

        def thread_own_context() -> tuple[dict[str, Any], str]:
            return (tags_here(), REQUEST_ID.get())

        # Run on the worker thread outside any snapshot: what the thread itself holds.
        ctxprop.uninstrument()
        assert pool.submit(thread_own_context).result() == ({}, "-")
    finally:
        pool.shutdown()


def test_thread_subclass_overriding_run_runs_in_the_starters_context() -> None:
    """A Thread subclass with its own run() sees the starter's tags; its writes stay in the thread."""
    ctxprop.instrument()
    out: queue.Queue[tuple[dict[str, Any], str]] = queue.Queue()

    class Worker(threading.Thread):
        def run(self) -> None:
            out.put((tags_here(), REQUEST_ID.get()))
            ctxprop.set_tag("thread", "wrote")
            REQUEST_ID.set("thread")

    with ctxprop.isolation_scope():
        ctxprop.set_tag("job", "j")
        token = REQUEST_ID.set("r-2")
        t = Worker()
        t.start()
        t.join()
        assert out.get(timeout=5) == ({"job": "j"}, "r-2")
        assert tags_here() == {"job": "j"}
        assert REQUEST_ID.get() == "r-2"
        REQUEST_ID.reset(token)
    assert "run" not in t.__dict__  # the per-start binding is dropped after the run


def test_thread_target_and_timer_propagate() -> None:
    """threading.Thread(target=...) and threading.Timer run in the context of the start() caller."""
    ctxprop.instrument()
    out: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
    with ctxprop.isolation_scope():
        ctxprop.set_tag("job", "timer")
        t = threading.Thread(target=lambda: out.put(("thread", tags_here())))
        t.start()
        timer = threading.Timer(0.0, lambda: out.put(("timer", tags_here())))
        timer.start()
        t.join()
        timer.join()
    assert sorted([out.get(timeout=5), out.get(timeout=5)]) == [
        ("thread", {"job": "timer"}),
        ("timer", {"job": "timer"}),
    ]


def test_starting_a_thread_twice_still_raises() -> None:
    """start() on a started thread raises RuntimeError as without instrument(), and leaves no binding."""
    ctxprop.instrument()
    t = threading.Thread(target=int)
    t.start()
    t.join()
    with pytest.raises(RuntimeError, match="only be started once"):
        t.start()
    assert "run" not in t.__dict__


class _NeverInitialised(threading.Thread):
    def __init__(self) -> None:  # forgets super().__init__()
        pass

    def run(self) -> None:
        pass


def _start_error(thread: threading.Thread) -> tuple[type[BaseException], str]:
    with pytest.raises(BaseException) as info:  # noqa: PT011 - the point: whatever start() raises
        thread.start()
    return info.type, str(info.value)


def test_start_errors_are_the_standard_librarys_own() -> None:
    """A thread whose __init__ never ran raises the same RuntimeError from start() as uninstrumented."""
    plain = _start_error(_NeverInitialised())
    ctxprop.instrument()
    assert _start_error(_NeverInitialised()) == plain == (RuntimeError, "thread.__init__() not called")


def test_a_thread_whose_run_cannot_be_read_still_starts() -> None:
    """If reading a Thread subclass's run fails, start() works as uninstrumented; the fault is counted."""
    ran = threading.Event()

    class Odd(threading.Thread):
        def __getattribute__(self, name: str) -> Any:
            if name == "run" and not ran.is_set():
                ran.set()
                raise LookupError("run is computed later")
            return super().__getattribute__(name)

        def run(self) -> None:
            pass

    ctxprop.instrument()
    t = Odd()
    t.start()
    t.join(timeout=30)
    assert ran.is_set()
    assert not t.is_alive()
    assert ctxprop.stats()["instrument_errors"] == 1


class _CountingHook:
    def __init__(self) -> None:
        self.captures = 0

    def capture(self) -> int:
        self.captures += 1
        return self.captures

    def activate(self, state: int) -> None:
        pass


def test_no_double_capture_with_context_aware_executor() -> None:
    """A ContextAwareThreadPoolExecutor under instrument() captures once per task, not twice."""
    ctxprop.instrument()
    hook = _CountingHook()
    _capture.register_capture_hook(hook)
    try:
        with ctxprop.isolation_scope(), ctxprop.ContextAwareThreadPoolExecutor(max_workers=1) as pool:
            ctxprop.set_tag("k", "v")
            assert pool.submit(tags_here).result()["k"] == "v"
            assert hook.captures == 1
        with ThreadPoolExecutor(max_workers=1) as plain:
            plain.submit(int).result()
            assert hook.captures == 2
    finally:
        _capture.unregister_capture_hook(hook)


def test_uninstrument_under_a_foreign_wrapper_switches_ours_off() -> None:
    """If another wrapt wrapper went on top of ours, uninstrument() leaves it there but ours stops acting."""
    ctxprop.instrument()
    foreign = wrapt.wrap_function_wrapper(ThreadPoolExecutor, "submit", lambda w, i, a, k: w(*a, **k))
    try:
        ctxprop.uninstrument()
        assert ThreadPoolExecutor.__dict__["submit"] is foreign
        with ctxprop.isolation_scope(), ThreadPoolExecutor(max_workers=1) as pool:
            ctxprop.set_tag("job", "x")
            assert pool.submit(tags_here).result() == {}
            ctxprop.instrument()  # re-enables ours without stacking a second one
            assert pool.submit(tags_here).result() == {"job": "x"}
            assert foreign.__wrapped__.__wrapped__ is ORIGINALS["submit"]
    finally:
        ctxprop.uninstrument()
        ThreadPoolExecutor.submit = ORIGINALS["submit"]  # type: ignore[method-assign]


def _round_work(i: int, child: int) -> tuple[int, dict[str, Any]]:
    with trace.get_tracer("seed").start_as_current_span(f"work-{i}-{child}"):
        seen = tags_here()
        ctxprop.set_tag("worker_wrote", child)  # must not reach the round or the next task
        return child, seen


def _seed_scenario(rounds: int) -> list[tuple[int, int, dict[str, Any]]]:
    async def main() -> list[tuple[int, int, dict[str, Any]]]:
        loop = asyncio.get_running_loop()
        results = []
        with ThreadPoolExecutor(max_workers=2) as pool:
            for i in range(rounds):
                with ctxprop.isolation_scope(), trace.get_tracer("seed").start_as_current_span(f"round-{i}"):
                    ctxprop.set_tag("round", i)
                    outs = await asyncio.gather(
                        *(loop.run_in_executor(pool, _round_work, i, c) for c in range(3))
                    )
                    assert ctxprop.get_isolation_scope().tags == {"round": i}
                    results.extend((i, c, seen) for c, seen in outs)
        return results

    return asyncio.run(main())


def _orphans(spans: list[ReadableSpan]) -> tuple[int, int]:
    rounds = {s.context.span_id: s.name for s in spans if s.name.startswith("round-")}
    workers = [s for s in spans if s.name.startswith("work-")]
    bad = sum(
        1
        for s in workers
        if s.parent is None or rounds.get(s.parent.span_id) != "round-" + s.name.split("-")[1]
    )
    return bad, len(workers)


def test_seed_scenario_with_a_plain_pool_under_instrument(exporter: InMemorySpanExporter) -> None:
    """Seed scenario, 100 rounds, plain 2-thread pool: every worker span parented and tagged by its round."""
    ctxprop.instrument()
    results = _seed_scenario(100)
    assert all(seen == {"round": i} for i, _, seen in results)
    spans = finished(exporter)
    assert _orphans(spans) == (0, 300)
    for s in spans:
        if s.name.startswith("work-"):
            assert s.attributes is not None
            assert s.attributes["round"] == int(s.name.split("-")[1])
            assert "worker_wrote" not in s.attributes


def test_seed_scenario_without_instrument_orphans_spans(exporter: InMemorySpanExporter) -> None:
    """Control: the same scenario uninstrumented orphans the worker spans (so the test above can fail)."""
    _seed_scenario(5)
    bad, total = _orphans(finished(exporter))
    assert total == 15
    assert bad == 15


def _process_task() -> tuple[dict[str, Any], int]:
    with trace.get_tracer("proc").start_as_current_span("in-process-worker"):
        return tags_here(), os.getpid()


def test_run_in_executor_with_a_process_pool_under_instrument(exporter: InMemorySpanExporter) -> None:
    """loop.run_in_executor(ProcessPoolExecutor) carries tags and the span; worker spans come home."""
    ctxprop.instrument()

    async def main() -> tuple[tuple[dict[str, Any], int], int]:
        loop = asyncio.get_running_loop()
        fork = multiprocessing.get_context("fork")
        with (
            ProcessPoolExecutor(max_workers=1, mp_context=fork) as pool,
            ctxprop.isolation_scope(),
            trace.get_tracer("t").start_as_current_span("submitter") as span,
        ):
            ctxprop.set_tag("job", "proc")
            result = await loop.run_in_executor(pool, _process_task)
            return result, span.get_span_context().span_id

    (tags, pid), parent_id = asyncio.run(main())
    assert tags == {"job": "proc"}
    assert pid != os.getpid()
    spans = {s.name: s for s in finished(exporter)}
    worker = spans["in-process-worker"]
    assert worker.parent is not None
    assert worker.parent.span_id == parent_id
    assert worker.attributes is not None
    assert worker.attributes["job"] == "proc"


def test_plain_process_pool_submit_and_map_under_instrument(exporter: InMemorySpanExporter) -> None:
    """A plain ProcessPoolExecutor's submit and map carry tags and the span; worker spans come home."""
    ctxprop.instrument()
    with (
        ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork")) as pool,
        ctxprop.isolation_scope(),
        trace.get_tracer("t").start_as_current_span("submitter") as span,
    ):
        ctxprop.set_tag("job", "plain-proc")
        first = pool.submit(_process_task).result(timeout=60)
        rest = list(pool.map(_process_task_n, range(3)))
    assert first[0] == {"job": "plain-proc"}
    assert rest == [{"job": "plain-proc"}] * 3
    workers = [s for s in finished(exporter) if s.name == "in-process-worker"]
    assert len(workers) == 4
    assert {s.parent.span_id for s in workers if s.parent} == {span.get_span_context().span_id}


def _process_task_n(_: int) -> dict[str, Any]:
    return _process_task()[0]


class _QueueExecutor(Executor):
    """A custom executor on one long-lived thread, started before any context existed."""

    def __init__(self) -> None:
        self._q: queue.Queue[Any] = queue.Queue()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while (item := self._q.get()) is not None:
            fut, fn, args = item
            fut.set_result(fn(*args))

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        self._q.put((fut, fn, args))
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._q.put(None)
        self._t.join()


def test_run_in_executor_with_a_custom_executor_under_instrument() -> None:
    """loop.run_in_executor with a non-pool Executor runs the function in the caller's context."""
    executor = _QueueExecutor()
    ctxprop.instrument()

    async def main() -> dict[str, Any]:
        with ctxprop.isolation_scope():
            ctxprop.set_tag("job", "custom")
            return await asyncio.get_running_loop().run_in_executor(executor, tags_here)

    try:
        assert asyncio.run(main()) == {"job": "custom"}
    finally:
        executor.shutdown()


def test_instrumentor_class_drives_instrument() -> None:
    """CtxpropInstrumentor is an OpenTelemetry BaseInstrumentor that turns instrument() on and off."""
    from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

    inst = CtxpropInstrumentor()
    assert isinstance(inst, BaseInstrumentor)
    assert tuple(inst.instrumentation_dependencies()) == ()
    inst.instrument()
    assert is_instrumented()
    inst.uninstrument()
    assert not is_instrumented()
    assert ThreadPoolExecutor.submit is ORIGINALS["submit"]


CHILD = """
import json, threading
from concurrent.futures import ThreadPoolExecutor
import wrapt, ctxprop
ctxprop.set_tag("job", "auto")  # a script's own main context: no scope to restore
with ThreadPoolExecutor(max_workers=1) as pool:
    seen = pool.submit(lambda: dict(ctxprop.get_isolation_scope().tags)).result()
print(json.dumps({"wrapped": isinstance(ThreadPoolExecutor.__dict__["submit"], wrapt.FunctionWrapper),
                  "seen": seen}))
"""


def test_opentelemetry_instrument_turns_it_on_through_the_entry_point(tmp_path: Path) -> None:
    """`opentelemetry-instrument python app.py` loads the ctxprop entry point: plain pools propagate."""
    script = tmp_path / "app.py"
    script.write_text(CHILD)
    tool = Path(sys.executable).with_name("opentelemetry-instrument")
    if not tool.exists():
        pytest.skip("opentelemetry-instrument is not installed next to this interpreter")
    env = child_env(
        {
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
            "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "threading",
        }
    )
    proc = subprocess.run(
        [str(tool), sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"wrapped": True, "seen": {"job": "auto"}}


def test_concurrent_futures_wait_sees_instrumented_futures() -> None:
    """Futures from an instrumented plain pool work with concurrent.futures.wait/as_completed."""
    ctxprop.instrument()
    with ctxprop.isolation_scope(), ThreadPoolExecutor(max_workers=2) as pool:
        ctxprop.set_tag("n", 1)
        futs = [pool.submit(tags_here) for _ in range(4)]
        done, _ = concurrent.futures.wait(futs, timeout=30)
        assert len(done) == 4
        assert all(f.result() == {"n": 1} for f in concurrent.futures.as_completed(futs))


def test_cancelled_timer_never_runs_its_function() -> None:
    """Under instrument(), Timer.cancel() still stops the timer before its function runs."""
    ctxprop.instrument()
    fired = threading.Event()
    timer = threading.Timer(120.0, fired.set)
    timer.start()
    timer.cancel()
    timer.join(timeout=30)
    assert not timer.is_alive()
    assert not fired.is_set()


def test_thread_subclass_overriding_start_still_propagates() -> None:
    """A Thread subclass whose start() does its own work then calls super().start() runs in the
    starter's context, and its own start() code ran."""
    ctxprop.instrument()

    class Tracked(threading.Thread):
        def start(self) -> None:
            self.started_from = REQUEST_ID.get()
            super().start()

        def run(self) -> None:
            self.seen = REQUEST_ID.get()

    token = REQUEST_ID.set("starter")
    try:
        t = Tracked()
        t.start()
        t.join(timeout=30)
    finally:
        REQUEST_ID.reset(token)
    assert (t.started_from, t.seen) == ("starter", "starter")


AT_EXIT_CHILD = """
import atexit, contextvars, json, threading
import ctxprop
V = contextvars.ContextVar("v", default="-")
ctxprop.instrument()
V.set("main")

def at_exit():
    seen = []
    t = threading.Thread(target=lambda: seen.append(V.get()))
    t.start()
    t.join(30)
    print(json.dumps({"atexit_thread_saw": seen}), flush=True)

atexit.register(at_exit)
parked = threading.Event()
threading.Thread(target=parked.wait, daemon=True).start()  # a daemon still running at exit
print(json.dumps({"started": True}), flush=True)
"""


def test_threads_at_interpreter_exit_under_instrument() -> None:
    """A thread started from an atexit handler still propagates, and a daemon thread still running at
    exit does not hold the process: exit status 0, nothing on stderr."""
    result = run_child(AT_EXIT_CHILD, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.json_lines == [{"started": True}, {"atexit_thread_saw": ["main"]}]


def test_asyncio_to_thread_under_instrument_forks_the_scopes() -> None:
    """Under instrument(), asyncio.to_thread on the loop's default executor sees the awaiting task's
    tags, and the thread's tag writes stay in the thread."""

    def task() -> dict[str, Any]:
        seen = tags_here()
        ctxprop.set_tag("leak", True)
        return seen

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        with ctxprop.isolation_scope():
            ctxprop.set_tag("req", 1)
            seen = await asyncio.to_thread(task)
            return seen, tags_here()

    assert asyncio.run(main()) == ({"req": 1}, {"req": 1, "leak": True})  # control: it leaks back
    ctxprop.instrument()
    assert asyncio.run(main()) == ({"req": 1}, {"req": 1})
