"""ContextAwareThreadPoolExecutor and run_in_executor_with_context, with real threads and real loops."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import multiprocessing
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import run_child

import ctxprop
from ctxprop import _capture, _scopes

T = TypeVar("T")
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("test_executors.request_id", default="-")


@pytest.fixture(autouse=True)
def _clean_request_id() -> Iterator[None]:
    """Each test starts with no request id in the main thread's context (conftest clears the scopes)."""
    token = REQUEST_ID.set("-")
    yield
    REQUEST_ID.reset(token)


def _tags() -> dict[str, Any]:
    return {**ctxprop.get_isolation_scope().tags, **ctxprop.get_current_scope().tags}


def test_contextvar_and_tags_travel() -> None:
    """submit() carries an application ContextVar and both scopes' tags into the task."""
    REQUEST_ID.set("r-1")
    ctxprop.set_tag("job", "nightly")
    ctxprop.get_current_scope().set_tag("step", 3)
    with ctxprop.ContextAwareThreadPoolExecutor(max_workers=2) as pool:
        assert pool.submit(lambda: (REQUEST_ID.get(), _tags())).result(timeout=30) == (
            "r-1",
            {"job": "nightly", "step": 3},
        )


def test_tasks_never_see_each_other() -> None:
    """On one reused thread, a task sees neither an earlier task's writes nor leaks them back."""
    ctxprop.set_tag("base", 0)
    with ctxprop.ContextAwareThreadPoolExecutor(max_workers=1) as pool:

        def task(i: int) -> tuple[str, dict[str, Any]]:
            seen = REQUEST_ID.get(), _tags()
            REQUEST_ID.set(f"task-{i}")
            ctxprop.set_tag("leak", i)
            ctxprop.get_current_scope().set_tag("leak_cur", i)
            return seen

        results = [pool.submit(task, i).result(timeout=30) for i in range(5)]
    assert results == [("-", {"base": 0})] * 5
    assert REQUEST_ID.get() == "-"
    assert _tags() == {"base": 0}


def test_worker_threads_own_context_untouched() -> None:
    """After tasks ran, the worker thread's own context has no trace of them."""
    REQUEST_ID.set("submitter")
    ctxprop.set_tag("t", 1)
    with ctxprop.ContextAwareThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(REQUEST_ID.set, "inside").result(timeout=30)
        pool.submit(ctxprop.set_tag, "inside", 1).result(timeout=30)
        # The stdlib submit runs fn in the thread's own context: that is what we inspect.
        own = ThreadPoolExecutor.submit(
            pool,
            lambda: (
                REQUEST_ID.get(),
                _scopes.ISOLATION.get() is _scopes.NO_SCOPE,
                _capture.propagated(),
            ),
        ).result(timeout=30)
    assert own == ("-", True, False)


def test_nested_submits() -> None:
    """A task that submits to the same pool hands on its own context, tags included."""
    ctxprop.set_tag("level", "outer")
    with ctxprop.ContextAwareThreadPoolExecutor(max_workers=2) as pool:

        def outer() -> tuple[dict[str, Any], str, dict[str, Any]]:
            ctxprop.set_tag("level", "inner-submitter")
            REQUEST_ID.set("from-outer")
            inner = pool.submit(lambda: (_tags(), REQUEST_ID.get())).result(timeout=30)
            return inner[0], inner[1], _tags()

        inner_tags, inner_rid, outer_after = pool.submit(outer).result(timeout=30)
    assert inner_tags == {"level": "inner-submitter"}
    assert inner_rid == "from-outer"
    assert outer_after == {"level": "inner-submitter"}
    assert _tags() == {"level": "outer"}


def test_map_captures_per_item() -> None:
    """map() runs every item in the submitter's context and keeps the order of results."""
    REQUEST_ID.set("mapper")
    ctxprop.set_tag("batch", 9)
    with ctxprop.ContextAwareThreadPoolExecutor(max_workers=2) as pool:
        out = list(
            pool.map(lambda i: (i, REQUEST_ID.get(), _tags()["batch"]), range(20), timeout=60)
        )
    assert out == [(i, "mapper", 9) for i in range(20)]


def test_any_keyword_names_pass_through() -> None:
    """Keyword arguments named like the pool's or ctxprop's own parameters reach the task untouched."""

    def echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, kwargs

    names = {"fn": 1, "self": 2, "callable": 3, "iso_tags": 4, "cur_tags": 5, "extra": 6, "args": 7}
    with ctxprop.ContextAwareThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(echo, "a", "b", **names).result(timeout=30) == (("a", "b"), names)


class _CountingPool(ThreadPoolExecutor):
    """Another pool subclass with its own submit, to mix in after ours."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.submitted = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


class _MixedPool(ctxprop.ContextAwareThreadPoolExecutor, _CountingPool):
    pass


def test_cooperates_with_other_pool_subclasses() -> None:
    """Mixed with another pool's submit in the MRO, both run: that one is called and context travels."""
    REQUEST_ID.set("mixed")
    assert not _MixedPool._stdlib_submit_next
    with _MixedPool(max_workers=1) as pool:
        assert pool.submit(REQUEST_ID.get).result(timeout=30) == "mixed"
        assert list(pool.map(lambda _: REQUEST_ID.get(), range(3))) == ["mixed"] * 3
    assert pool.submitted == 4


def test_subclass_overriding_submit_keeps_propagation() -> None:
    """A user subclass whose submit calls super() still propagates (the fast path stays correct)."""

    class Audited(ctxprop.ContextAwareThreadPoolExecutor):
        calls = 0

        def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
            type(self).calls += 1
            return super().submit(fn, *args, **kwargs)

    REQUEST_ID.set("audited")
    assert Audited._stdlib_submit_next
    with Audited(max_workers=1) as pool:
        assert pool.submit(REQUEST_ID.get).result(timeout=30) == "audited"
    assert Audited.calls == 1


def test_exception_is_the_tasks_own() -> None:
    """A task's exception reaches future.result() as the same object, with the task's frame."""
    err = ValueError("bad input")

    def failing() -> None:
        raise err

    with ctxprop.ContextAwareThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(failing)
        with pytest.raises(ValueError, match="bad input") as info:
            fut.result(timeout=30)
    assert info.value is err
    assert "failing" in "".join(traceback.format_tb(info.value.__traceback__))


def test_cancellation() -> None:
    """A queued task can be cancelled and never runs; cancel_futures on shutdown cancels the rest."""
    gate = threading.Event()
    started = threading.Event()
    ran: list[int] = []

    def blocker() -> None:
        started.set()
        gate.wait(timeout=60)

    pool = ctxprop.ContextAwareThreadPoolExecutor(max_workers=1)
    try:
        first = pool.submit(blocker)
        assert started.wait(timeout=30)
        queued = pool.submit(ran.append, 1)
        later = [pool.submit(ran.append, i) for i in range(2, 5)]
        assert queued.cancel()
        with pytest.raises(CancelledError):
            queued.result(timeout=1)
    finally:
        gate.set()
        pool.shutdown(wait=True, cancel_futures=True)
    assert first.done()
    assert 1 not in ran
    assert all(f.cancelled() or f.done() for f in later)


def test_initializer_runs_in_a_clean_context() -> None:
    """The initializer sees none of the submitter's context and gets its initargs."""
    REQUEST_ID.set("submitter")
    ctxprop.set_tag("t", 1)
    seen: Future[tuple[str, bool, bool, str]] = Future()

    def init(arg: str) -> None:
        seen.set_result(
            (
                REQUEST_ID.get(),
                _scopes.ISOLATION.get() is _scopes.NO_SCOPE,
                _capture.propagated(),
                arg,
            )
        )

    with ctxprop.ContextAwareThreadPoolExecutor(max_workers=1, initializer=init, initargs=("x",)) as pool:
        assert pool.submit(REQUEST_ID.get).result(timeout=30) == "submitter"
    assert seen.result(timeout=30) == ("-", True, False, "x")


INHERITING_POOL = """
import contextvars, json, sys, threading
from concurrent.futures import Future
import ctxprop
REQUEST_ID = contextvars.ContextVar("request_id", default="-")
REQUEST_ID.set("submitter")
plain = []
thread = threading.Thread(target=lambda: plain.append(REQUEST_ID.get()))
thread.start()
thread.join()
seen = Future()
pool = ctxprop.ContextAwareThreadPoolExecutor(
    max_workers=1, initializer=lambda: seen.set_result(REQUEST_ID.get())
)
task = pool.submit(REQUEST_ID.get).result(timeout=30)
pool.shutdown()
print(json.dumps({"plain_thread": plain[0], "initializer": seen.result(timeout=30), "task": task}))
"""


@pytest.mark.parametrize("inherit", ["0", "1"])
def test_initializer_in_clean_context_even_when_threads_inherit(inherit: str) -> None:
    """With PYTHON_THREAD_INHERIT_CONTEXT=0/1 (3.14+: pool threads start in a copy of the submitter's
    context), the initializer's context is empty and the task still gets the submitter's."""
    res = run_child(INHERITING_POOL, env={"PYTHON_THREAD_INHERIT_CONTEXT": inherit})
    assert res.returncode == 0, res.stderr
    inherits = sys.version_info >= (3, 14) and inherit == "1"
    assert res.last("plain_thread") == ("submitter" if inherits else "-")  # the case is real where it can be
    assert res.last("initializer") == "-"
    assert res.last("task") == "submitter"


def test_non_callable_initializer_rejected() -> None:
    """A non-callable initializer raises TypeError at construction, as the stdlib does."""
    with pytest.raises(TypeError):
        ctxprop.ContextAwareThreadPoolExecutor(initializer=42)  # type: ignore[arg-type]


def test_shutdown_without_wait() -> None:
    """shutdown(wait=False) returns while a task is running; the task still completes in its context."""
    gate = threading.Event()
    REQUEST_ID.set("before-shutdown")
    pool = ctxprop.ContextAwareThreadPoolExecutor(max_workers=1)
    fut = pool.submit(lambda: (gate.wait(timeout=60), REQUEST_ID.get())[1])
    pool.shutdown(wait=False)
    assert not fut.done()
    with pytest.raises(RuntimeError):
        pool.submit(REQUEST_ID.get)
    gate.set()
    assert fut.result(timeout=30) == "before-shutdown"


def test_plain_pool_shows_the_problem() -> None:
    """The stdlib pool runs tasks in the thread's stale context: what ctxprop fixes."""
    REQUEST_ID.set("submitter")
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(REQUEST_ID.set, "leftover").result(timeout=30)
        assert pool.submit(REQUEST_ID.get).result(timeout=30) == "leftover"


class _ThreadPerTaskExecutor(Executor):
    """A minimal third-party executor: one new thread per task, no context handling of its own."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        fut: Future[T] = Future()

        def target() -> None:
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - delivered through the future
                fut.set_exception(exc)

        threading.Thread(target=target).start()
        return fut


@pytest.mark.parametrize(
    "make_executor",
    [
        pytest.param(lambda: None, id="loop-default"),
        pytest.param(lambda: ThreadPoolExecutor(max_workers=2), id="plain-thread-pool"),
        pytest.param(lambda: ctxprop.ContextAwareThreadPoolExecutor(max_workers=2), id="context-aware"),
        pytest.param(_ThreadPerTaskExecutor, id="custom-executor"),
    ],
)
def test_run_in_executor_with_context(make_executor: Callable[[], Executor | None]) -> None:
    """Any executor (or the loop's default) runs the function in the awaiting task's context, kwargs too."""
    executor = make_executor()

    def work(a: int, *, b: int) -> tuple[int, str, dict[str, Any], bool]:
        seen = (a + b, REQUEST_ID.get(), _tags(), _capture.propagated())
        ctxprop.set_tag("leak", True)
        REQUEST_ID.set("leaked")
        return seen

    async def main() -> list[tuple[int, str, dict[str, Any], bool]]:
        async def one(i: int) -> tuple[int, str, dict[str, Any], bool]:
            REQUEST_ID.set(f"task-{i}")
            with ctxprop.isolation_scope():
                ctxprop.set_tag("i", i)
                loop = asyncio.get_running_loop() if i % 2 else None
                return await ctxprop.run_in_executor_with_context(loop, executor, work, i, b=100)

        return await asyncio.gather(*(one(i) for i in range(6)))

    try:
        results = asyncio.run(main())
    finally:
        if executor is not None:
            executor.shutdown()
    assert results == [(i + 100, f"task-{i}", {"i": i}, True) for i in range(6)]


def test_run_in_executor_with_context_cancelled() -> None:
    """Cancelling the awaiting task raises CancelledError in it; the loop and the pool stay usable."""
    gate = threading.Event()
    started = threading.Event()

    def blocker() -> str:
        started.set()
        gate.wait(timeout=60)
        return "done"

    async def main() -> tuple[bool, str]:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=1) as pool:
            task = asyncio.ensure_future(ctxprop.run_in_executor_with_context(loop, pool, blocker))
            await loop.run_in_executor(None, started.wait, 30)
            task.cancel()
            try:
                await task
                cancelled = False
            except asyncio.CancelledError:
                cancelled = True
            gate.set()
            again = await ctxprop.run_in_executor_with_context(loop, pool, lambda: "again")
        return cancelled, again

    assert asyncio.run(main()) == (True, "again")


def _process_work(x: int) -> tuple[int, dict[str, Any]]:
    tracer = trace.get_tracer("test.process")
    with tracer.start_as_current_span("in-process-worker"):
        return x * 2, dict(ctxprop.get_isolation_scope().tags)


def test_run_in_executor_with_context_process_pool() -> None:
    """A plain ProcessPoolExecutor gets the tags and the trace; the worker's span returns to our pipeline."""
    exporter = InMemorySpanExporter()
    ctxprop.init(exporter=exporter)
    tracer = trace.get_tracer("test")

    async def main() -> tuple[tuple[int, dict[str, Any]], int]:
        mp = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=1, mp_context=mp) as pool, ctxprop.isolation_scope():
            ctxprop.set_tag("tenant", "acme")
            with tracer.start_as_current_span("submitter") as span:
                result = await ctxprop.run_in_executor_with_context(None, pool, _process_work, 21)
                return result, span.get_span_context().span_id

    (value, tags), parent_id = asyncio.run(main())
    assert (value, tags) == (42, {"tenant": "acme"})
    assert ctxprop.flush()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    worker_span = spans["in-process-worker"]
    assert worker_span.parent is not None
    assert worker_span.parent.span_id == parent_id
    assert dict(worker_span.attributes or {})["tenant"] == "acme"


def _to_thread_task(i: int, *, suffix: str) -> tuple[str, dict[str, Any], str]:
    seen = (REQUEST_ID.get(), _tags(), suffix)
    ctxprop.set_tag("leak", i)
    ctxprop.get_current_scope().set_tag("leak_cur", i)
    return seen


def _run_to_thread(executor: Executor | None) -> list[tuple[tuple[str, dict[str, Any], str], dict[str, Any]]]:
    async def one(i: int) -> tuple[tuple[str, dict[str, Any], str], dict[str, Any]]:
        REQUEST_ID.set(f"task-{i}")
        with ctxprop.isolation_scope():
            ctxprop.set_tag("i", i)
            seen = await asyncio.to_thread(_to_thread_task, i, suffix="s")
            return seen, _tags()

    async def main() -> list[tuple[tuple[str, dict[str, Any], str], dict[str, Any]]]:
        if executor is not None:
            asyncio.get_running_loop().set_default_executor(executor)
        return await asyncio.gather(*(one(i) for i in range(4)))

    return asyncio.run(main())


def test_asyncio_to_thread_on_a_context_aware_default_executor() -> None:
    """asyncio.to_thread on a ContextAwareThreadPoolExecutor: the thread sees the awaiting task's
    context, and its tag writes do not reach the awaiting task (to_thread's own copy_context alone
    would share the task's scopes)."""
    results = _run_to_thread(ctxprop.ContextAwareThreadPoolExecutor(max_workers=2))
    assert results == [((f"task-{i}", {"i": i}, "s"), {"i": i}) for i in range(4)]


def test_asyncio_to_thread_on_a_plain_executor_leaks_writes_back() -> None:
    """Control: on the stdlib default executor, to_thread's writes reach the awaiting task's scopes."""
    results = _run_to_thread(None)
    assert all(after.get("leak") == i for i, (_, after) in enumerate(results))


class _NullHook:
    def capture(self) -> None:
        return None

    def activate(self, state: None) -> None:
        pass


def test_a_context_run_partial_whose_context_is_busy_is_left_as_made() -> None:
    """partial(ctx.run, f) submitted from inside ctx (so hooks cannot capture in it) is submitted as
    made: nothing fails at submit, and running it fails just as it would on the stdlib pool."""
    ctx = contextvars.copy_context()
    hook = _NullHook()
    _capture.register_capture_hook(hook)
    try:
        with ctxprop.ContextAwareThreadPoolExecutor(max_workers=1) as pool:

            def submit_and_wait() -> Future[Any]:
                fut = pool.submit(functools.partial(ctx.run, REQUEST_ID.get))
                fut.exception(timeout=30)  # ctx stays entered here until the task ran
                return fut

            fut = ctx.run(submit_and_wait)
    finally:
        _capture.unregister_capture_hook(hook)
    with pytest.raises(RuntimeError, match="cannot enter context"):
        fut.result(timeout=30)
