"""@worker: a child span and forked scopes per call, exceptions recorded and re-raised, the pool warning."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import ctxprop
from ctxprop import _pipeline


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    """A pipeline that exports to memory."""
    exp = InMemorySpanExporter()
    ctxprop.init(exporter=exp, service_name="test-worker")
    return exp


def _spans(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    assert ctxprop.flush(timeout=30)
    return {s.name: s for s in exporter.get_finished_spans()}


@ctxprop.worker
def resize(image_id: int, *, scale: float = 1.0) -> str:
    """Resize an image."""
    ctxprop.set_tag("image", image_id)
    ctxprop.get_current_scope().set_tag("scale", scale)
    return f"{image_id}@{scale}"


def test_bare_decorator_makes_a_child_span(exporter: InMemorySpanExporter) -> None:
    """@worker: one span per call, named after the function, child of the current span."""
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("caller") as caller:
        assert resize(7, scale=0.5) == "7@0.5"
    span = _spans(exporter)["resize"]
    assert span.parent is not None
    assert span.parent.span_id == caller.get_span_context().span_id
    assert span.status.status_code == StatusCode.UNSET


def test_decorator_with_arguments(exporter: InMemorySpanExporter) -> None:
    """@worker(name=, attributes=): the span has that name, those attributes and the scope tags."""

    @ctxprop.worker(name="thumbnail", attributes={"size": 128, "tenant": "explicit"})
    def thumb(x: int) -> int:
        return x + 1

    ctxprop.set_tag("tenant", "from-scope")
    ctxprop.set_tag("region", "eu")
    assert thumb(1) == 2
    attrs = dict(_spans(exporter)["thumbnail"].attributes or {})
    assert attrs == {"size": 128, "tenant": "explicit", "region": "eu"}


def test_each_call_has_its_own_scopes(exporter: InMemorySpanExporter) -> None:
    """Tags a call sets stay in that call: the caller and the next call never see them."""
    ctxprop.set_tag("job", "j1")

    @ctxprop.worker
    def step(i: int) -> dict[str, Any]:
        seen = {**ctxprop.get_isolation_scope().tags, **ctxprop.get_current_scope().tags}
        ctxprop.set_tag("step", i)
        ctxprop.get_current_scope().set_tag("cur", i)
        return seen

    assert step(1) == {"job": "j1"}
    assert step(2) == {"job": "j1"}
    assert dict(ctxprop.get_isolation_scope().tags) == {"job": "j1"}
    assert dict(ctxprop.get_current_scope().tags) == {}
    assert ctxprop.flush(timeout=30)
    spans = [s for s in exporter.get_finished_spans() if s.name.endswith("step")]
    assert [dict(s.attributes or {}) for s in spans] == [{"job": "j1"}, {"job": "j1"}]


def test_exception_recorded_and_reraised_unchanged(exporter: InMemorySpanExporter) -> None:
    """The exception leaves the call as the same object with its own frame; the span is ERROR with it."""
    err = LookupError("no such image")

    @ctxprop.worker
    def fetch() -> None:
        raise err

    with pytest.raises(LookupError) as info:
        fetch()
    assert info.value is err
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert frames[-1] == "fetch"
    span = next(s for s in _spans(exporter).values() if s.name.endswith("fetch"))
    assert span.status.status_code == StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]
    assert dict(span.events[0].attributes or {})["exception.type"] == "LookupError"


def test_metadata_preserved() -> None:
    """The decorated function keeps its name, docstring and wrapped original."""
    assert resize.__name__ == "resize"
    assert resize.__doc__ == "Resize an image."
    assert inspect.signature(resize) == inspect.signature(resize.__wrapped__)  # type: ignore[attr-defined]


def test_non_callable_rejected() -> None:
    """@worker on something that is not callable raises TypeError at decoration."""
    with pytest.raises(TypeError, match="callable"):
        ctxprop.worker(42)  # type: ignore[call-overload]


def test_async_worker(exporter: InMemorySpanExporter) -> None:
    """An async def worker stays a coroutine function; its span covers the await and is a child span."""
    inside: Future[int] = Future()

    @ctxprop.worker(name="fetch-async")
    async def fetch(x: int) -> int:
        ctxprop.set_tag("inner", True)
        await asyncio.sleep(0)
        inside.set_result(time.time_ns())
        await asyncio.sleep(0)
        return x * 3

    assert inspect.iscoroutinefunction(fetch)
    tracer = trace.get_tracer("test")

    async def main() -> tuple[int, int]:
        with tracer.start_as_current_span("loop-caller") as caller:
            value = await fetch(5)
            return value, caller.get_span_context().span_id

    value, caller_id = asyncio.run(main())
    assert value == 15
    span = _spans(exporter)["fetch-async"]
    assert span.parent is not None
    assert span.parent.span_id == caller_id
    assert span.start_time is not None
    assert span.end_time is not None
    assert span.start_time <= inside.result(timeout=1) <= span.end_time
    assert "inner" not in ctxprop.get_isolation_scope().tags


def test_async_worker_exception(exporter: InMemorySpanExporter) -> None:
    """An async worker's exception is re-raised as the same object and recorded on its span."""
    err = RuntimeError("async failure")

    @ctxprop.worker(name="failing-async")
    async def failing() -> None:
        await asyncio.sleep(0)
        raise err

    with pytest.raises(RuntimeError) as info:
        asyncio.run(failing())
    assert info.value is err
    assert _spans(exporter)["failing-async"].status.status_code == StatusCode.ERROR


def test_follows_a_new_provider() -> None:
    """After the pipeline is re-initialised, worker spans go to the new provider, not a cached one."""

    @ctxprop.worker(name="w")
    def w() -> None:
        pass

    first, second = InMemorySpanExporter(), InMemorySpanExporter()
    ctxprop.init(exporter=first)
    w()
    assert ctxprop.flush(timeout=30)
    _pipeline._reset_for_tests()
    ctxprop.init(exporter=second)
    w()
    assert ctxprop.flush(timeout=30)
    assert len(first.get_finished_spans()) == 1
    assert len(second.get_finished_spans()) == 1


def _record_warnings() -> warnings.catch_warnings:  # type: ignore[type-arg]
    return warnings.catch_warnings(record=True)


def test_warns_once_on_plain_pool(exporter: InMemorySpanExporter) -> None:
    """On a plain pool thread with no propagated context: one RuntimeWarning naming the fix, ever."""

    @ctxprop.worker
    def task(i: int) -> int:
        return i

    def many_calls_on_two_pools() -> list[int]:
        with ThreadPoolExecutor(max_workers=2) as pool:
            out = list(pool.map(task, range(10)))
        with ThreadPoolExecutor(max_workers=1) as pool:
            out.append(pool.submit(task, 99).result(timeout=30))
        return out

    with pytest.warns(RuntimeWarning, match="ContextAwareThreadPoolExecutor") as record:
        results = many_calls_on_two_pools()
    assert results == [*range(10), 99]
    ours = [w for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "task()" in message
    assert "run_in_executor_with_context" in message
    assert "instrument()" in message


def test_warning_is_once_under_a_race(exporter: InMemorySpanExporter) -> None:
    """Many pool threads making their first call at the same moment still produce one warning."""
    n = 8
    barrier = threading.Barrier(n)

    @ctxprop.worker
    def racer() -> None:
        pass

    def go() -> None:
        barrier.wait(timeout=30)
        racer()

    with _record_warnings() as record:
        warnings.simplefilter("always")
        with ThreadPoolExecutor(max_workers=n) as pool:
            for f in [pool.submit(go) for _ in range(n)]:
                f.result(timeout=30)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1


def test_warns_for_loop_default_executor(exporter: InMemorySpanExporter) -> None:
    """loop.run_in_executor(None, ...) is a plain pool too: it warns."""

    @ctxprop.worker
    def blocking() -> str:
        return "ok"

    async def main() -> str:
        return await asyncio.get_running_loop().run_in_executor(None, blocking)

    with pytest.warns(RuntimeWarning, match="blocking"):
        assert asyncio.run(main()) == "ok"


def test_no_warning_when_propagated(exporter: InMemorySpanExporter) -> None:
    """No warning via ContextAwareThreadPoolExecutor, run_in_executor_with_context, a call or a Thread."""

    @ctxprop.worker
    def quiet() -> int:
        return 1

    with _record_warnings() as record:
        warnings.simplefilter("always")
        with ctxprop.ContextAwareThreadPoolExecutor(max_workers=2) as pool:
            assert sum(pool.map(lambda _: quiet(), range(4))) == 4

        async def main() -> int:
            with ThreadPoolExecutor(max_workers=1) as plain:
                return await ctxprop.run_in_executor_with_context(None, plain, quiet)

        assert asyncio.run(main()) == 1
        assert quiet() == 1
        t = threading.Thread(target=quiet)
        t.start()
        t.join()
    assert [str(w.message) for w in record] == []


def test_orphan_under_plain_pool_parented_under_context_aware(exporter: InMemorySpanExporter) -> None:
    """What the warning is about: the same worker is an orphan on a plain pool, a child on ctxprop's."""
    tracer = trace.get_tracer("test")

    @ctxprop.worker(name="job")
    def job() -> None:
        pass

    with tracer.start_as_current_span("submitter") as parent:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with ThreadPoolExecutor(max_workers=1) as plain:
                plain.submit(job).result(timeout=30)
        with ctxprop.ContextAwareThreadPoolExecutor(max_workers=1) as aware:
            aware.submit(job).result(timeout=30)
    assert ctxprop.flush(timeout=30)
    jobs = [s for s in exporter.get_finished_spans() if s.name == "job"]
    parents = [s.parent.span_id if s.parent else None for s in jobs]
    assert parents == [None, parent.get_span_context().span_id]


def test_generator_functions_rejected() -> None:
    """@worker refuses generator functions, whose span would end before their work runs."""

    def gen() -> Iterator[int]:
        yield 1

    async def agen() -> Any:
        yield 1

    with pytest.raises(TypeError, match="generator"):
        ctxprop.worker(gen)
    with pytest.raises(TypeError, match="generator"):
        ctxprop.worker(name="x")(agen)


def test_method_keeps_binding(exporter: InMemorySpanExporter) -> None:
    """A decorated method still binds self; its span is named by the qualified name."""

    class Resizer:
        def __init__(self) -> None:
            self.factor = 3

        @ctxprop.worker
        def scale(self, x: int) -> int:
            return x * self.factor

    assert Resizer().scale(2) == 6
    assert any(name.endswith("Resizer.scale") for name in _spans(exporter))


def _enter_and_check(how: str, saved: ctxprop.Scope) -> bool:
    """Enter scopes the way ``how`` says, then report whether the code counts as propagated."""
    from ctxprop._capture import propagated

    if how == "as is":
        return propagated()
    if how == "isolation_scope":
        with ctxprop.isolation_scope():
            return propagated()
    if how == "new_scope":
        with ctxprop.new_scope():
            return propagated()
    if how == "use_scope":
        with ctxprop.use_scope(saved):
            return propagated()
    if how == "use both":
        with ctxprop.use_isolation_scope(saved), ctxprop.use_scope(saved.fork()):
            inner = propagated()
        return inner and propagated()
    raise AssertionError(how)


HOWS = ["as is", "isolation_scope", "new_scope", "use_scope", "use both"]


@pytest.mark.parametrize("how", HOWS)
def test_propagation_mark_survives_scopes_entered_in_a_task(how: str) -> None:
    """In a propagated task, entering isolation_scope()/new_scope()/use_*scope() keeps it propagated."""
    saved = ctxprop.Scope({"made": "by hand"})
    with ctxprop.ContextAwareThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(_enter_and_check, how, saved).result(timeout=30)
    assert ctxprop.capture().run(_enter_and_check, how, saved)


@pytest.mark.parametrize("how", HOWS)
def test_scopes_carried_out_of_a_task_do_not_fake_propagation(how: str) -> None:
    """On a plain pool thread, activating a scope taken from a propagated task does not count as
    propagated, whatever scopes are entered around it: @worker still warns there."""
    from ctxprop._capture import propagated

    carried = ctxprop.capture().run(ctxprop.get_isolation_scope)
    with ThreadPoolExecutor(max_workers=1) as plain:
        assert not plain.submit(_enter_and_check, how, carried).result(timeout=30)

        def under_carried() -> tuple[bool, bool]:
            with ctxprop.use_isolation_scope(carried):
                inside = _enter_and_check(how, carried)
            return inside, propagated()

        assert plain.submit(under_carried).result(timeout=30) == (False, False)


def test_no_false_warning_when_a_task_enters_its_own_scopes(exporter: InMemorySpanExporter) -> None:
    """A worker called inside scopes a propagated task entered (even hand-made ones) does not warn."""

    @ctxprop.worker
    def inner() -> int:
        return 1

    def task() -> int:
        mine_iso, mine_cur = ctxprop.Scope(), ctxprop.Scope()
        with (
            ctxprop.isolation_scope(),
            ctxprop.new_scope(),
            ctxprop.use_isolation_scope(mine_iso),
            ctxprop.use_scope(mine_cur),
        ):
            return inner()

    with _record_warnings() as record:
        warnings.simplefilter("always")
        with ctxprop.ContextAwareThreadPoolExecutor(max_workers=1) as pool:
            assert pool.submit(task).result(timeout=30) == 1
        ctxprop.instrument()
        try:
            with ThreadPoolExecutor(max_workers=1) as plain:
                assert plain.submit(task).result(timeout=30) == 1
        finally:
            ctxprop.uninstrument()
    assert [str(w.message) for w in record] == []
