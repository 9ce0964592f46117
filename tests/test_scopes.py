"""Scopes: copy-on-write tags, per-context scopes, the context managers, and tags on spans."""

from __future__ import annotations

import contextlib
import contextvars
import os
import select
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import ctxprop
from ctxprop import _capture, _instrument, _scopes


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    """A pipeline that exports to memory."""
    exp = InMemorySpanExporter()
    ctxprop.init(exporter=exp, service_name="test-scopes")
    return exp


def _in_fresh_context(fn):  # type: ignore[no-untyped-def]
    return contextvars.Context().run(fn)


def test_fork_writes_never_cross() -> None:
    """A write on a fork or on its parent never reaches the other."""
    parent = ctxprop.Scope({"a": 1})
    child = parent.fork()
    child.set_tag("b", 2)
    parent.set_tag("c", 3)
    child.remove_tag("a")
    assert dict(parent.tags) == {"a": 1, "c": 3}
    assert dict(child.tags) == {"b": 2}


def test_fork_shares_the_tags_dict() -> None:
    """fork() is O(1): it shares the parent's dict instead of copying it, whatever its size."""
    parent = ctxprop.Scope({f"k{i}": i for i in range(1000)})
    child = parent.fork()
    assert child._tags is parent._tags
    child.set_tag("k0", -1)
    assert child._tags is not parent._tags
    assert parent.tags["k0"] == 0


def test_tags_are_read_only() -> None:
    """Scope.tags cannot be written through."""
    scope = ctxprop.Scope({"a": 1})
    with pytest.raises(TypeError):
        scope.tags["a"] = 2  # type: ignore[index]


def test_invalid_tags_are_skipped_and_counted() -> None:
    """A non-str key or a value OTel would reject is skipped and counted, never raised."""
    scope = ctxprop.Scope()
    scope.set_tag(1, "x")  # type: ignore[arg-type]
    scope.set_tag("obj", object())  # type: ignore[arg-type]
    scope.set_tag("mixed", [1, "a"])  # type: ignore[list-item]
    scope.set_tag("none", None)  # type: ignore[arg-type]
    scope.set_tag("ok", [1, 2])
    assert dict(scope.tags) == {"ok": (1, 2)}
    assert ctxprop.stats()["invalid_tags"] == 4


def test_list_values_are_frozen() -> None:
    """A list tag is stored as a tuple, so the caller changing its list cannot change a fork."""
    values = ["a", "b"]
    scope = ctxprop.Scope()
    scope.set_tag("l", values)
    values.append("c")
    assert scope.tags["l"] == ("a", "b")


def test_remove_and_clear() -> None:
    """remove_tag drops one tag (absent key is fine); clear drops all."""
    scope = ctxprop.Scope({"a": 1, "b": 2})
    scope.remove_tag("a")
    scope.remove_tag("missing")
    assert dict(scope.tags) == {"b": 2}
    scope.clear()
    assert dict(scope.tags) == {}


def test_getter_is_stable_within_a_context() -> None:
    """get_isolation_scope()/get_current_scope() return the same scope each time in one context."""

    def probe() -> bool:
        return (
            ctxprop.get_isolation_scope() is ctxprop.get_isolation_scope()
            and ctxprop.get_current_scope() is ctxprop.get_current_scope()
        )

    assert _in_fresh_context(probe)


def test_context_without_scope_gets_its_own() -> None:
    """Two threads that never had a scope get different scopes, never a process-wide shared one."""
    barrier = threading.Barrier(2)
    results: list[Future[tuple[int, int, dict[str, object]]]] = [Future(), Future()]

    def run(i: int) -> None:
        try:
            iso = ctxprop.get_isolation_scope()
            cur = ctxprop.get_current_scope()
            iso.set_tag("thread", i)
            barrier.wait(timeout=30)
            results[i].set_result((id(iso), id(cur), dict(iso.tags)))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            results[i].set_exception(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    a, b = (f.result(timeout=30) for f in results)
    for t in threads:
        t.join()
    assert a[0] != b[0]
    assert a[1] != b[1]
    assert a[2] == {"thread": 0}
    assert b[2] == {"thread": 1}
    assert _scopes.NO_SCOPE.tags == {}


def test_set_tag_goes_to_isolation_scope() -> None:
    """ctxprop.set_tag writes the isolation scope, not the current one."""

    def probe() -> tuple[dict[str, object], dict[str, object]]:
        ctxprop.set_tag("k", "v")
        return dict(ctxprop.get_isolation_scope().tags), dict(ctxprop.get_current_scope().tags)

    assert _in_fresh_context(probe) == ({"k": "v"}, {})


def test_isolation_scope_forks_both_and_restores() -> None:
    """isolation_scope() forks both scopes, writes inside stay inside, both are restored on exit."""

    def probe() -> None:
        ctxprop.set_tag("outer", 1)
        ctxprop.get_current_scope().set_tag("cur", 1)
        iso_before, cur_before = ctxprop.get_isolation_scope(), ctxprop.get_current_scope()
        with ctxprop.isolation_scope() as scope:
            assert scope is ctxprop.get_isolation_scope()
            assert scope is not iso_before
            assert ctxprop.get_current_scope() is not cur_before
            assert dict(scope.tags) == {"outer": 1}
            ctxprop.set_tag("inner", 2)
            ctxprop.get_current_scope().set_tag("cur", 2)
        assert ctxprop.get_isolation_scope() is iso_before
        assert ctxprop.get_current_scope() is cur_before
        assert dict(iso_before.tags) == {"outer": 1}
        assert dict(cur_before.tags) == {"cur": 1}

    _in_fresh_context(probe)


def test_new_scope_forks_current_only() -> None:
    """new_scope() forks the current scope and leaves the isolation scope alone."""

    def probe() -> None:
        iso = ctxprop.get_isolation_scope()
        cur = ctxprop.get_current_scope()
        cur.set_tag("a", 1)
        with ctxprop.new_scope() as inner:
            assert ctxprop.get_isolation_scope() is iso
            assert inner is ctxprop.get_current_scope() is not cur
            inner.set_tag("a", 2)
        assert ctxprop.get_current_scope() is cur
        assert cur.tags["a"] == 1

    _in_fresh_context(probe)


def test_use_scope_does_not_fork() -> None:
    """use_isolation_scope/use_scope activate the given scope itself and restore on exit."""

    def probe() -> None:
        mine_iso, mine_cur = ctxprop.Scope(), ctxprop.Scope()
        before = ctxprop.get_isolation_scope(), ctxprop.get_current_scope()
        with ctxprop.use_isolation_scope(mine_iso), ctxprop.use_scope(mine_cur):
            assert ctxprop.get_isolation_scope() is mine_iso
            assert ctxprop.get_current_scope() is mine_cur
            ctxprop.set_tag("x", 1)
        assert mine_iso.tags["x"] == 1
        assert (ctxprop.get_isolation_scope(), ctxprop.get_current_scope()) == before

    _in_fresh_context(probe)


def test_active_tags_does_not_plant_a_scope() -> None:
    """Reading the active tags (as span start does) leaves a scope-less context scope-less."""

    def probe() -> bool:
        assert _scopes.active_tags() is None
        return _scopes.ISOLATION.get() is _scopes.NO_SCOPE and _scopes.CURRENT.get() is _scopes.NO_SCOPE

    assert _in_fresh_context(probe)


def test_concurrent_writers_lose_nothing() -> None:
    """Many threads writing one shared scope at once: every write lands."""
    scope = ctxprop.Scope()
    start = threading.Barrier(8)

    def writer(n: int) -> None:
        start.wait(timeout=30)
        for i in range(300):
            scope.set_tag(f"t{n}-{i}", i)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(scope.tags) == 8 * 300


def test_spans_get_scope_tags(exporter: InMemorySpanExporter) -> None:
    """Spans carry the active tags as attributes: isolation first, current overriding, explicit winning."""
    tracer = trace.get_tracer("test")

    def probe() -> None:
        ctxprop.set_tag("tenant", "acme")
        ctxprop.set_tag("level", "isolation")
        ctxprop.get_current_scope().set_tag("level", "current")
        ctxprop.get_current_scope().set_tag("step", "parse")
        with tracer.start_as_current_span("plain"):
            pass
        with tracer.start_as_current_span("explicit", attributes={"step": "mine"}):
            pass

    _in_fresh_context(probe)
    with tracer.start_as_current_span("untagged"):
        pass
    assert ctxprop.flush()
    spans = {s.name: dict(s.attributes or {}) for s in exporter.get_finished_spans()}
    assert spans["plain"] == {"tenant": "acme", "level": "current", "step": "parse"}
    assert spans["explicit"] == {"tenant": "acme", "level": "current", "step": "mine"}
    assert spans["untagged"] == {}


class _SignallingLock:
    """Stands in for the scopes' write lock: tells when a second writer starts waiting for it."""

    def __init__(self, waiting: threading.Event) -> None:
        self._lock = threading.Lock()
        self._waiting = waiting
        self.holder: int | None = None

    def __enter__(self) -> None:
        if self.holder is not None and self.holder != threading.get_ident():
            self._waiting.set()
        self._lock.acquire()
        self.holder = threading.get_ident()

    def __exit__(self, *exc: object) -> None:
        self.holder = None
        self._lock.release()


class _PausingDict(dict):  # type: ignore[type-arg]
    """A tags dict whose copy() (the read in set_tag's read-copy-swap) pauses until released."""

    def __init__(self, *args: object, in_copy: threading.Event, go: threading.Event) -> None:
        super().__init__(*args)
        self.in_copy, self.go = in_copy, go

    def copy(self) -> dict[str, object]:
        self.in_copy.set()
        assert self.go.wait(timeout=30)
        return dict(self)


def test_clear_is_not_lost_to_a_concurrent_set_tag(monkeypatch: pytest.MonkeyPatch) -> None:
    """clear() during another thread's set_tag waits for it, so the old tags do not come back."""
    progressed, in_copy, go = threading.Event(), threading.Event(), threading.Event()
    monkeypatch.setattr(_scopes, "_write_lock", _SignallingLock(progressed))
    scope = ctxprop.Scope({"old": 1})
    scope._tags = _PausingDict(scope._tags, in_copy=in_copy, go=go)
    done: list[Future[None]] = [Future(), Future()]

    def run(i: int, fn: Callable[[], None]) -> None:
        try:
            fn()
            done[i].set_result(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            done[i].set_exception(exc)
        finally:
            progressed.set()

    setter = threading.Thread(target=run, args=(0, lambda: scope.set_tag("new", 2)))
    setter.start()
    assert in_copy.wait(timeout=30)
    progressed.clear()
    clearer = threading.Thread(target=run, args=(1, scope.clear))
    clearer.start()
    assert progressed.wait(timeout=30)  # clear() either finished or is waiting for the lock
    go.set()
    for f in done:
        f.result(timeout=30)
    setter.join()
    clearer.join()
    assert dict(scope.tags) == {}


@ctxprop.worker
def _forked_job() -> int:
    return 7


def _warning_claim() -> Any:
    """The lock of _forked_job's once-only warning (its claim, or the older blocking lock)."""
    once = next(
        cell.cell_contents
        for cell in _forked_job.__closure__ or ()
        if type(cell.cell_contents).__name__ == "_WarnOnce"
    )
    return getattr(once, "_lock", None) or once._claim


def _child_sets_tags() -> bytes:
    scope = ctxprop.Scope()
    scope.set_tag("k", 1)
    scope.remove_tag("k")
    scope.clear()
    return b"ok"


def _child_instruments() -> bytes:
    _capture.register_capture_hook(_NullHook())
    ctxprop.instrument()
    ctxprop.uninstrument()
    return b"ok"


def _child_calls_a_worker_on_a_plain_pool() -> bytes:
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=1) as pool:
        warnings.simplefilter("ignore")
        return b"ok" if pool.submit(_forked_job).result(timeout=30) == 7 else b"bad"


class _NullHook:
    def capture(self) -> None:
        return None

    def activate(self, state: None) -> None:
        pass


FORK_CASES = {
    "scope-writes": (lambda: [_scopes._write_lock], _child_sets_tags),
    "instrument-and-hooks": (lambda: [_instrument._lock, _capture._hooks_lock], _child_instruments),
    "worker-warning": (lambda: [_warning_claim()], _child_calls_a_worker_on_a_plain_pool),
}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("case", list(FORK_CASES))
def test_forked_child_never_hangs_on_a_lock_held_at_fork(case: str) -> None:
    """A process forked while another thread held one of ctxprop's locks (mid set_tag(), instrument(),
    hook registration, or @worker's warning) can still do that itself: nothing waits for ever."""
    locks_of, in_child = FORK_CASES[case]
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with contextlib.ExitStack() as stack:
            for lock in locks_of():
                stack.enter_context(lock)
            holding.set()
            release.wait(timeout=60)

    holder = threading.Thread(target=hold)
    holder.start()
    pid = 0
    try:
        assert holding.wait(timeout=30)
        r, w = os.pipe()
        # Forking with another thread alive is this test's very point: 3.12+ says so (checked below).
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.write(w, in_child())
            finally:
                os._exit(0)
        os.close(w)
        ready, _, _ = select.select([r], [], [], 30)
        answer = os.read(r, 8) if ready else b""
        os.close(r)
    finally:
        release.set()
        holder.join(timeout=30)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert answer == b"ok"
    fork_warnings = [w for w in caught if "multi-threaded" in str(w.message)]
    assert len(fork_warnings) == (1 if sys.version_info >= (3, 12) else 0)
    assert all(w.category is DeprecationWarning for w in fork_warnings)
