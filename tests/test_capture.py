"""capture()/Snapshot/wrap: the whole context travels, scopes are forked, nothing leaks either way."""

from __future__ import annotations

import contextvars
import threading
from concurrent.futures import Future
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import ctxprop
from ctxprop import _capture, _scopes

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("test_capture.request_id", default="-")


def _in_thread(fn: Any, *args: Any) -> Any:
    """Run fn in a new thread (whose context is empty) and return its result or raise its exception."""
    fut: Future[Any] = Future()

    def target() -> None:
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            fut.set_exception(exc)

    t = threading.Thread(target=target)
    t.start()
    try:
        return fut.result(timeout=60)
    finally:
        t.join()


def test_application_contextvar_travels() -> None:
    """An application ContextVar set before capture() is seen by the task on another thread."""
    token = REQUEST_ID.set("r-42")
    try:
        snap = ctxprop.capture()
    finally:
        REQUEST_ID.reset(token)
    assert _in_thread(snap.run, REQUEST_ID.get) == "r-42"


def test_otel_context_travels() -> None:
    """A span started inside Snapshot.run on another thread is a child of the span active at capture."""
    exporter = InMemorySpanExporter()
    ctxprop.init(exporter=exporter)
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("parent") as parent:
        snap = ctxprop.capture()

    def child() -> None:
        with tracer.start_as_current_span("child"):
            pass

    _in_thread(snap.run, child)
    assert ctxprop.flush()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["child"].parent is not None
    assert spans["child"].parent.span_id == parent.get_span_context().span_id
    assert spans["child"].context.trace_id == parent.get_span_context().trace_id


def test_tags_are_those_at_capture_time() -> None:
    """Tags the submitter writes after capture() are not seen by the task."""
    ctxprop.set_tag("round", 1)
    ctxprop.get_current_scope().set_tag("step", "a")
    snap = ctxprop.capture()
    ctxprop.set_tag("round", 2)
    ctxprop.get_current_scope().set_tag("step", "b")

    def read() -> tuple[dict[str, Any], dict[str, Any]]:
        return dict(ctxprop.get_isolation_scope().tags), dict(ctxprop.get_current_scope().tags)

    assert _in_thread(snap.run, read) == ({"round": 1}, {"step": "a"})
    assert snap.isolation_tags == {"round": 1}
    assert snap.current_tags == {"step": "a"}


def test_task_writes_reach_neither_submitter_nor_next_run() -> None:
    """What a run sets (tags, ContextVars) reaches neither the submitter nor a later run of the snapshot."""
    ctxprop.set_tag("base", 1)
    submitter_scope = ctxprop.get_isolation_scope()
    snap = ctxprop.capture()

    def mutate() -> tuple[dict[str, Any], str]:
        seen = dict(ctxprop.get_isolation_scope().tags), REQUEST_ID.get()
        ctxprop.set_tag("leak", True)
        ctxprop.get_current_scope().set_tag("leak", True)
        REQUEST_ID.set("leaked")
        return seen

    assert _in_thread(snap.run, mutate) == ({"base": 1}, "-")
    assert _in_thread(snap.run, mutate) == ({"base": 1}, "-")
    assert snap.run(mutate) == ({"base": 1}, "-")
    assert dict(submitter_scope.tags) == {"base": 1}
    assert dict(ctxprop.get_current_scope().tags) == {}
    assert REQUEST_ID.get() == "-"


def test_calling_threads_context_untouched() -> None:
    """After Snapshot.run, the calling thread's own context holds exactly what it held before."""
    snap = ctxprop.capture()

    def probe() -> tuple[bool, bool, bool]:
        before = contextvars.copy_context()
        snap.run(lambda: (REQUEST_ID.set("x"), ctxprop.set_tag("y", 1)))
        after = contextvars.copy_context()
        return (
            dict(before.items()) == dict(after.items()),
            _scopes.ISOLATION.get() is _scopes.NO_SCOPE,
            _capture.propagated(),
        )

    assert _in_thread(probe) == (True, True, False)


def test_run_concurrently_from_many_threads() -> None:
    """One snapshot run at once on 16 threads: each run sees only its own writes."""
    ctxprop.set_tag("shared", "yes")
    snap = ctxprop.capture()
    n = 16
    barrier = threading.Barrier(n)

    def task(i: int) -> tuple[int, str, Any, Any]:
        ctxprop.set_tag("who", i)
        REQUEST_ID.set(f"r{i}")
        barrier.wait(timeout=60)
        tags = ctxprop.get_isolation_scope().tags
        return i, REQUEST_ID.get(), tags["who"], tags["shared"]

    futures: list[Future[tuple[int, str, Any, Any]]] = [Future() for _ in range(n)]

    def target(i: int) -> None:
        try:
            futures[i].set_result(snap.run(task, i))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            futures[i].set_exception(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    results = [f.result(timeout=60) for f in futures]
    for t in threads:
        t.join()
    assert results == [(i, f"r{i}", i, "yes") for i in range(n)]


def test_propagated_marker() -> None:
    """propagated() is true inside a snapshot run and nowhere else."""
    assert not ctxprop._capture.propagated()
    assert ctxprop.capture().run(_capture.propagated)
    assert not _capture.propagated()


def test_exceptions_pass_through_unchanged() -> None:
    """An exception raised by the task comes out of Snapshot.run as the same object."""
    err = KeyError("missing")

    def boom() -> None:
        raise err

    with pytest.raises(KeyError) as info:
        ctxprop.capture().run(boom)
    assert info.value is err


def test_args_and_kwargs_pass_through() -> None:
    """Snapshot.run forwards positional and keyword arguments (even one called ``fn``)."""

    def f(a: int, *, fn: str) -> str:
        return f"{a}-{fn}"

    assert ctxprop.capture().run(f, 1, fn="x") == "1-x"


def test_wrap_binds_context_now() -> None:
    """wrap(fn) runs every later call, from any thread, in the context captured at wrap time."""
    token = REQUEST_ID.set("at-wrap")
    ctxprop.set_tag("t", 1)

    def read(suffix: str) -> str:
        """Doc of read."""
        return f"{REQUEST_ID.get()}:{ctxprop.get_isolation_scope().tags.get('t')}:{suffix}"

    bound = ctxprop.wrap(read)
    REQUEST_ID.reset(token)
    ctxprop.set_tag("t", 2)
    assert _in_thread(bound, "a") == "at-wrap:1:a"
    assert bound("b") == "at-wrap:1:b"
    assert bound.__name__ == "read"
    assert bound.__doc__ == "Doc of read."
    assert bound.__wrapped__ is read  # type: ignore[attr-defined]


def test_snapshot_is_a_handle() -> None:
    """Snapshots compare by identity and hash (a Context is not hashable)."""
    a, b = ctxprop.capture(), ctxprop.capture()
    assert a == a  # noqa: PLR0124 - the point: a snapshot equals itself
    assert a != b
    assert len({a, b}) == 2
    assert isinstance(a.context, contextvars.Context)


class _Hook:
    def __init__(self) -> None:
        self.var: contextvars.ContextVar[str] = contextvars.ContextVar("hook", default="none")
        self.source = "submitter"
        self.captured_on: list[str] = []

    def capture(self) -> str:
        self.captured_on.append(threading.current_thread().name)
        return self.source

    def activate(self, state: str) -> None:
        self.var.set(f"activated:{state}")


class _BrokenHook:
    def capture(self) -> str:
        raise RuntimeError("capture fails")

    def activate(self, state: str) -> None:
        raise RuntimeError("never called")


def test_capture_hook_carries_third_party_state() -> None:
    """A registered hook captures on the submitting thread and activates inside the task's context."""
    hook = _Hook()
    _capture.register_capture_hook(hook)
    _capture.register_capture_hook(hook)  # idempotent
    try:
        snap = ctxprop.capture()
        hook.source = "changed later"
        assert _in_thread(snap.run, hook.var.get) == "activated:submitter"
        assert hook.captured_on == [threading.current_thread().name]
        assert hook.var.get() == "none"
        with ctxprop.ContextAwareThreadPoolExecutor(max_workers=1) as pool:
            assert pool.submit(hook.var.get).result(timeout=30) == "activated:changed later"
    finally:
        _capture.unregister_capture_hook(hook)
    assert ctxprop.capture().run(hook.var.get) == "none"


def test_broken_hook_never_fails_the_task() -> None:
    """A hook that raises is counted; the task still runs and capture() still returns."""
    hook = _BrokenHook()
    _capture.register_capture_hook(hook)
    try:
        assert ctxprop.capture().run(lambda: 7) == 7
    finally:
        _capture.unregister_capture_hook(hook)
    assert ctxprop.stats()["capture_hook_errors"] == 1
