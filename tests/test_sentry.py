"""The Sentry adapter, against the real sentry-sdk with an in-process transport keeping events in a list."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sentry_sdk
from sentry_sdk.transport import Transport
from support import run_child

import ctxprop
from ctxprop import _capture, _sentry
from ctxprop._process_pool import bind_for_process, unpack_result


class ListTransport(Transport):
    """Keeps every event Sentry would send, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def capture_envelope(self, envelope: Any) -> None:
        event = envelope.get_event()
        if event is not None:
            with self._lock:
                self.events.append(event)

    def by_message(self, message: str) -> dict[str, Any]:
        found = [e for e in self.events if e.get("message") == message]
        assert len(found) == 1, (message, [e.get("message") for e in self.events])
        return found[0]


@pytest.fixture
def sentry() -> Iterator[ListTransport]:
    """sentry-sdk initialised with an in-memory transport and only the ctxprop integration."""
    transport = ListTransport()
    sentry_sdk.init(
        dsn="http://public@127.0.0.1:9/1",
        transport=transport,
        default_integrations=False,
        auto_enabling_integrations=False,
        integrations=[_sentry.CtxpropIntegration()],
    )
    # setup_once() runs once per process; the fixture switches the adapter on for every test itself.
    _sentry.enable()
    try:
        with sentry_sdk.isolation_scope():
            yield transport
    finally:
        _sentry.disable()
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)


def _tags(event: dict[str, Any]) -> dict[str, Any]:
    return dict(event.get("tags") or {})


def test_submitter_tags_reach_events_captured_in_pool_tasks(sentry: ListTransport) -> None:
    """Each round's Sentry tags are on its tasks' events, on reused threads; a plain pool loses them."""
    for pool_class in (ctxprop.ContextAwareThreadPoolExecutor, ThreadPoolExecutor):
        with pool_class(max_workers=2) as pool:
            for rnd in range(1, 6):
                with sentry_sdk.isolation_scope():
                    sentry_sdk.set_tag("round", str(rnd))
                    futures = [
                        pool.submit(sentry_sdk.capture_message, f"{pool_class.__name__} {rnd}.{j}")
                        for j in range(3)
                    ]
                    for f in futures:
                        f.result()
    for rnd in range(1, 6):
        for j in range(3):
            ours = sentry.by_message(f"ContextAwareThreadPoolExecutor {rnd}.{j}")
            assert _tags(ours).get("round") == str(rnd)
            plain = sentry.by_message(f"ThreadPoolExecutor {rnd}.{j}")
            assert _tags(plain).get("round") != str(rnd)


def test_task_scope_changes_do_not_leak_back_or_forward(sentry: ListTransport) -> None:
    """A tag set by a task is on its own event only: not on the submitter's nor the next task's."""

    def task(i: int) -> None:
        sentry_sdk.set_tag(f"task{i}", "yes")
        sentry_sdk.get_current_scope().set_tag(f"current{i}", "yes")
        sentry_sdk.capture_message(f"task {i}")

    sentry_sdk.set_tag("submitter", "yes")
    with ctxprop.ContextAwareThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(task, 1).result()
        pool.submit(task, 2).result()
    sentry_sdk.capture_message("submitter")
    t1, t2, sub = (sentry.by_message(m) for m in ("task 1", "task 2", "submitter"))
    assert _tags(t1) == {"submitter": "yes", "task1": "yes", "current1": "yes"}
    assert _tags(t2) == {"submitter": "yes", "task2": "yes", "current2": "yes"}
    assert _tags(sub) == {"submitter": "yes"}


def test_without_the_adapter_a_task_writes_into_the_submitters_scope(sentry: ListTransport) -> None:
    """Control: a bare context copy shares Sentry's mutable scope objects, so a task's tag leaks back."""
    _sentry.disable()
    sentry_sdk.set_tag("submitter", "yes")
    with ctxprop.ContextAwareThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(sentry_sdk.set_tag, "task", "leaked").result()
    sentry_sdk.capture_message("submitter")
    assert _tags(sentry.by_message("submitter")) == {"submitter": "yes", "task": "leaked"}


def test_scopes_are_forked_at_submit_time(sentry: ListTransport) -> None:
    """A task sees the submitter's tags as they were at submit, not changes made while it waited."""
    gate = threading.Event()
    with ctxprop.ContextAwareThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(gate.wait, 30)  # occupies the only thread
        sentry_sdk.set_tag("phase", "at-submit")
        fut = pool.submit(sentry_sdk.capture_message, "queued")
        sentry_sdk.set_tag("phase", "later")
        gate.set()
        fut.result()
    assert _tags(sentry.by_message("queued"))["phase"] == "at-submit"


def test_run_in_executor_with_context_carries_sentry_scopes(sentry: ListTransport) -> None:
    """run_in_executor_with_context carries the tags, with a plain pool and with the loop's default."""

    async def handler(request_id: str, executor: Any) -> None:
        with sentry_sdk.isolation_scope():
            sentry_sdk.set_tag("request_id", request_id)
            await ctxprop.run_in_executor_with_context(
                None, executor, sentry_sdk.capture_message, f"req {request_id}"
            )

    async def main() -> None:
        with ThreadPoolExecutor(max_workers=2) as plain:
            await asyncio.gather(*(handler(f"p{i}", plain) for i in range(4)))
        await asyncio.gather(*(handler(f"d{i}", None) for i in range(4)))

    asyncio.run(main())
    for rid in [f"p{i}" for i in range(4)] + [f"d{i}" for i in range(4)]:
        assert _tags(sentry.by_message(f"req {rid}")) == {"request_id": rid}


class OwnThreadExecutor(Executor):
    """A custom executor: each call on a thread of its own, started from one long-lived dispatcher thread."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._dispatcher = threading.Thread(target=self._dispatch, daemon=True)
        self._dispatcher.start()

    def _dispatch(self) -> None:
        while (job := self._jobs.get()) is not None:
            threading.Thread(target=self._run, args=job).start()

    @staticmethod
    def _run(fut: Future[Any], fn: Any, args: Any, kwargs: Any) -> None:
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the future, as a real executor does
            fut.set_exception(exc)

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        self._jobs.put((fut, fn, args, kwargs))
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._jobs.put(None)
        self._dispatcher.join()


def test_custom_executor_via_run_in_executor_with_context(sentry: ListTransport) -> None:
    """A custom Executor whose threads never saw the request: tags arrive, task tags stay in the task."""
    executor = OwnThreadExecutor()

    def task(rid: str) -> None:
        sentry_sdk.set_tag("task_of", rid)
        sentry_sdk.capture_message(f"custom {rid}")

    async def handler(rid: str) -> None:
        with sentry_sdk.isolation_scope():
            sentry_sdk.set_tag("request_id", rid)
            await ctxprop.run_in_executor_with_context(None, executor, task, rid)
            sentry_sdk.capture_message(f"after {rid}")

    async def main() -> None:
        await asyncio.gather(*(handler(f"c{i}") for i in range(5)))

    try:
        asyncio.run(main())
    finally:
        executor.shutdown()
    for i in range(5):
        assert _tags(sentry.by_message(f"custom c{i}")) == {"request_id": f"c{i}", "task_of": f"c{i}"}
        assert _tags(sentry.by_message(f"after c{i}")) == {"request_id": f"c{i}"}


def test_wrap_gives_each_run_its_own_scope(sentry: ListTransport) -> None:
    """A wrapped function called twice: the second call does not see the first call's tag."""

    def job(n: int) -> None:
        sentry_sdk.set_tag(f"call{n}", "yes")
        sentry_sdk.capture_message(f"call {n}")

    sentry_sdk.set_tag("origin", "main")
    bound = ctxprop.wrap(job)
    bound(1)
    bound(2)
    assert _tags(sentry.by_message("call 1")) == {"origin": "main", "call1": "yes"}
    assert _tags(sentry.by_message("call 2")) == {"origin": "main", "call2": "yes"}


def test_each_worker_call_runs_in_its_own_fork_of_sentrys_scopes(sentry: ListTransport) -> None:
    """``@worker`` forks Sentry's scopes per call as it forks ctxprop's, sync and async, called directly
    and on a plain pool's reused thread: a call sees its caller's tags, and what it sets (a tag, a user)
    stays in that call, neither in the caller's scope nor in the next call."""

    @ctxprop.worker
    def job(n: int) -> None:
        sentry_sdk.set_tag(f"call{n}", "yes")
        sentry_sdk.set_user({"id": f"u{n}"})
        sentry_sdk.capture_message(f"job {n}")

    @ctxprop.worker
    async def ajob(n: int) -> None:
        await asyncio.sleep(0)
        sentry_sdk.set_tag(f"call{n}", "yes")
        sentry_sdk.capture_message(f"job {n}")

    sentry_sdk.set_tag("origin", "main")
    job(1)
    job(2)
    asyncio.run(ajob(3))
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(ctxprop.wrap(job), 4).result(timeout=10)
        pool.submit(ctxprop.wrap(job), 5).result(timeout=10)
    for n in range(1, 6):
        assert _tags(sentry.by_message(f"job {n}")) == {"origin": "main", f"call{n}": "yes"}
    assert sentry.by_message("job 2")["user"] == {"id": "u2"}
    sentry_sdk.capture_message("the caller, after")
    after = sentry.by_message("the caller, after")
    assert _tags(after) == {"origin": "main"}
    assert "user" not in after


def test_disabled_adapter_costs_capture_nothing(
    sentry: ListTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disabled, capture() never touches Sentry (no hook, no scope fork); enabled, it forks the scopes."""
    forks = []
    real_fork = sentry_sdk.scope.Scope.fork

    def counting_fork(self: Any) -> Any:
        forks.append(self)
        return real_fork(self)

    monkeypatch.setattr(sentry_sdk.scope.Scope, "fork", counting_fork)
    sentry_sdk.get_current_scope()  # make sure both scopes exist in this context
    _sentry.disable()
    assert not _sentry.enabled()
    assert _sentry._HOOK not in _capture._hooks
    ctxprop.capture()
    assert forks == []
    _sentry.enable()
    ctxprop.capture()
    assert len(forks) == 2


def test_integration_and_auto_enable_in_a_fresh_process() -> None:
    """Fresh process: off after import; auto_enable() needs an initialised Sentry; the integration enables."""
    result = run_child(
        """
        import json
        import sentry_sdk
        from sentry_sdk.transport import Transport
        import ctxprop
        from ctxprop import _sentry

        class T(Transport):
            events = []
            def capture_envelope(self, envelope):
                ev = envelope.get_event()
                if ev is not None:
                    self.events.append(ev)

        before = _sentry.enabled()
        auto_uninitialised = _sentry.auto_enable()
        sentry_sdk.init(dsn="http://k@127.0.0.1:9/1", transport=T(), default_integrations=False,
                        integrations=[_sentry.CtxpropIntegration()])
        after_integration = _sentry.enabled()
        _sentry.disable()
        auto_initialised = _sentry.auto_enable()
        sentry_sdk.set_tag("job", "nightly")
        with ctxprop.ContextAwareThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(sentry_sdk.set_tag, "task", "x").result()
            pool.submit(sentry_sdk.capture_message, "from pool").result()
        sentry_sdk.capture_message("main")
        tags = {e["message"]: e.get("tags", {}) for e in T.events}
        print(json.dumps({"before": before, "auto_uninitialised": auto_uninitialised,
                          "after_integration": after_integration, "auto_initialised": auto_initialised,
                          "tags": tags}))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.json_lines[-1]
    assert out["before"] is False
    assert out["auto_uninitialised"] is False
    assert out["after_integration"] is True
    assert out["auto_initialised"] is True
    assert out["tags"] == {"from pool": {"job": "nightly"}, "main": {"job": "nightly"}}


def test_ctxprop_init_turns_the_adapter_on_when_sentry_is_initialised() -> None:
    """ctxprop.init() after sentry_sdk.init() (no integration named) enables Sentry scope forking."""
    result = run_child(
        """
        import json
        import sentry_sdk
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        import ctxprop
        from ctxprop import _sentry

        sentry_sdk.init(dsn="http://k@127.0.0.1:9/1", default_integrations=False)
        before = _sentry.enabled()
        ctxprop.init(exporter=InMemorySpanExporter(), handle_signals=False)
        print(json.dumps({"before": before, "after": _sentry.enabled()}))
        ctxprop.close()
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.json_lines[-1] == {"before": False, "after": True}


# --- process pools: the scopes' data travels with each task ---------------------------------------------


class FileTransport(Transport):
    """In a pool worker: appends every event Sentry would send to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def capture_envelope(self, envelope: Any) -> None:
        event = envelope.get_event()
        if event is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(event, default=str) + "\n")


def _init_worker_sentry(path: str) -> None:
    """Pool initializer: Sentry in the worker, sending to ``path`` (no ctxprop integration named)."""
    sentry_sdk.init(
        dsn="http://public@127.0.0.1:9/1",
        transport=FileTransport(path),
        default_integrations=False,
        auto_enabling_integrations=False,
    )


def _sentry_pool(
    path: Path, method: str = "fork", cls: type[ProcessPoolExecutor] = ctxprop.ContextAwareProcessPoolExecutor
) -> ProcessPoolExecutor:
    """A one-worker pool whose worker initialises Sentry with a transport writing events to ``path``."""
    return cls(
        max_workers=1,
        mp_context=multiprocessing.get_context(method),
        initializer=_init_worker_sentry,
        initargs=(str(path),),
    )


def _capture_in_worker(message: str, own_tag: str) -> int:
    """A task: sets a tag of its own (which must stay in this task), then captures ``message``."""
    sentry_sdk.set_tag(own_tag, "yes")
    sentry_sdk.capture_message(message)
    sentry_sdk.flush()
    return os.getpid()


def _worker_events(path: Path) -> dict[str, dict[str, Any]]:
    events: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        events[event["message"]] = event
    return events


def _noop() -> int:
    return os.getpid()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_process_pool_tasks_carry_the_submitters_sentry_scopes(
    sentry: ListTransport, tmp_path: Path, method: str
) -> None:
    """Each round's tags, user, contexts, extras, breadcrumbs reach events captured in a pool worker whose
    initializer inits Sentry; a task's own tag and the pool creator's scope never reach a later task."""
    path = tmp_path / "events.jsonl"
    pool = _sentry_pool(path, method)
    with pool:
        with sentry_sdk.isolation_scope():
            sentry_sdk.set_tag("pool_creator", "yes")
            worker_pid = pool.submit(_noop).result(timeout=60)  # starts the worker (forks it here)
        for rnd in range(1, 4):
            with sentry_sdk.isolation_scope():
                sentry_sdk.set_tag("round", str(rnd))
                sentry_sdk.set_user({"id": f"user-{rnd}"})
                sentry_sdk.set_context("job", {"round": rnd})
                sentry_sdk.set_extra("attempt", rnd)
                sentry_sdk.add_breadcrumb(message=f"crumb {rnd}", category="test")
                with sentry_sdk.new_scope():
                    sentry_sdk.get_current_scope().set_tag("phase", f"p{rnd}")
                    sentry_sdk.get_current_scope().set_level("warning")
                    sentry_sdk.get_current_scope().fingerprint = ["round", str(rnd)]
                    sentry_sdk.get_current_scope().set_transaction_name(f"job-{rnd}")
                    pid = pool.submit(_capture_in_worker, f"round {rnd}", f"own{rnd}").result(timeout=60)
                assert pid == worker_pid
    events = _worker_events(path)
    assert sorted(events) == ["round 1", "round 2", "round 3"]
    for rnd in range(1, 4):
        event = events[f"round {rnd}"]
        assert _tags(event) == {"round": str(rnd), "phase": f"p{rnd}", f"own{rnd}": "yes"}
        assert event["user"] == {"id": f"user-{rnd}"}
        assert event["contexts"]["job"] == {"round": rnd}
        assert event["extra"] == {"attempt": rnd}
        assert event["level"] == "warning"
        assert event["fingerprint"] == ["round", str(rnd)]
        assert event["transaction"] == f"job-{rnd}"
        assert [c["message"] for c in event["breadcrumbs"]["values"]] == [f"crumb {rnd}"]
    assert sentry.events == []  # nothing was captured in this process


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_plain_process_pool_through_run_in_executor_with_context(
    sentry: ListTransport, tmp_path: Path, method: str
) -> None:
    """A plain ProcessPoolExecutor behind run_in_executor_with_context: each request's Sentry tags and
    user are on the event its worker task captures; neither one task's own tag nor the scopes of the
    thread that started the worker reach another task."""
    path = tmp_path / "events.jsonl"

    async def handler(pool: ProcessPoolExecutor, rid: str) -> None:
        with sentry_sdk.isolation_scope():
            sentry_sdk.set_tag("request_id", rid)
            sentry_sdk.set_user({"id": f"user-{rid}"})
            await ctxprop.run_in_executor_with_context(
                None, pool, _capture_in_worker, f"req {rid}", f"own{rid}"
            )

    async def main() -> None:
        with _sentry_pool(path, method, ProcessPoolExecutor) as pool:
            with sentry_sdk.isolation_scope():
                # Starts (under fork: forks) the worker here; these scopes must not reach later tasks.
                sentry_sdk.set_tag("pool_creator", "yes")
                sentry_sdk.add_breadcrumb(message="creator crumb")
                await ctxprop.run_in_executor_with_context(None, pool, _noop)
            for rid in ("a", "b", "c"):
                await handler(pool, rid)

    asyncio.run(main())
    events = _worker_events(path)
    for rid in ("a", "b", "c"):
        event = events[f"req {rid}"]
        assert _tags(event) == {"request_id": rid, f"own{rid}": "yes"}
        assert event["user"] == {"id": f"user-{rid}"}
        assert "breadcrumbs" not in event or event["breadcrumbs"]["values"] == []


def test_plain_process_pool_under_instrument(sentry: ListTransport, tmp_path: Path) -> None:
    """Under ctxprop.instrument(), a plain ProcessPoolExecutor's submit carries the Sentry scope data."""
    path = tmp_path / "events.jsonl"
    ctxprop.instrument()
    try:
        with _sentry_pool(path, cls=ProcessPoolExecutor) as pool:
            for rnd in (1, 2):
                with sentry_sdk.isolation_scope():
                    sentry_sdk.set_tag("round", str(rnd))
                    pool.submit(_capture_in_worker, f"round {rnd}", f"own{rnd}").result(timeout=60)
    finally:
        ctxprop.uninstrument()
    events = _worker_events(path)
    for rnd in (1, 2):
        assert _tags(events[f"round {rnd}"]) == {"round": str(rnd), f"own{rnd}": "yes"}


def _sentry_state_in_worker() -> dict[str, Any]:
    """A task: whether Sentry is initialised here, and what ctxprop counted in this worker."""
    return {"initialized": sentry_sdk.is_initialized(), "stats": ctxprop.stats()}


def test_worker_without_sentry_initialised_runs_tasks_normally(sentry: ListTransport, tmp_path: Path) -> None:
    """Sentry not initialised in a (spawned) worker: tasks run and nothing is counted as a fault; once a
    task initialises Sentry there, later tasks' events carry their submitter's tags."""
    path = tmp_path / "events.jsonl"
    with ctxprop.ContextAwareProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        sentry_sdk.set_tag("job", "nightly")
        before = pool.submit(_sentry_state_in_worker).result(timeout=60)
        pool.submit(_init_worker_sentry, str(path)).result(timeout=60)
        pool.submit(_capture_in_worker, "after init", "own").result(timeout=60)
    assert before["initialized"] is False
    assert before["stats"].get("capture_hook_errors", 0) == 0
    assert _tags(_worker_events(path)["after init"]) == {"job": "nightly", "own": "yes"}


def test_unpicklable_scope_values_are_dropped_not_fatal(sentry: ListTransport, tmp_path: Path) -> None:
    """A tag, extra or breadcrumb that does not pickle is left out (and counted); the submit succeeds and
    the event carries everything else."""
    path = tmp_path / "events.jsonl"
    with _sentry_pool(path) as pool:
        sentry_sdk.set_tag("job", "nightly")
        sentry_sdk.set_tag("lock", threading.Lock())
        sentry_sdk.set_extra("fine", [1, 2])
        sentry_sdk.set_extra("handle", threading.Lock())
        sentry_sdk.add_breadcrumb(message="kept")
        sentry_sdk.add_breadcrumb(message="dropped", data={"lock": threading.Lock()})
        pool.submit(_capture_in_worker, "mixed", "own").result(timeout=60)
    event = _worker_events(path)["mixed"]
    assert _tags(event) == {"job": "nightly", "own": "yes"}
    assert event["extra"] == {"fine": [1, 2]}
    assert [c["message"] for c in event["breadcrumbs"]["values"]] == ["kept"]
    assert ctxprop.stats()["sentry_values_dropped"] == 3


def test_breadcrumbs_added_between_submits_reach_the_later_task(
    sentry: ListTransport, tmp_path: Path
) -> None:
    """From one scope: a task gets the breadcrumbs as they were at its submit (the pickled crumbs are
    reused only while the scope's crumbs are unchanged)."""
    path = tmp_path / "events.jsonl"
    with _sentry_pool(path) as pool:
        sentry_sdk.add_breadcrumb(message="one")
        pool.submit(_capture_in_worker, "first", "own").result(timeout=60)
        pool.submit(_capture_in_worker, "again", "own").result(timeout=60)
        sentry_sdk.add_breadcrumb(message="two")
        pool.submit(_capture_in_worker, "second", "own").result(timeout=60)
    events = _worker_events(path)
    crumbs = {m: [c["message"] for c in events[m]["breadcrumbs"]["values"]] for m in events}
    assert crumbs == {"first": ["one"], "again": ["one"], "second": ["one", "two"]}


def _tag_and_capture(message: str) -> None:
    sentry_sdk.set_tag("task", "yes")
    sentry_sdk.capture_message(message)


def test_bound_task_called_in_the_submitting_process(sentry: ListTransport) -> None:
    """bind_for_process's callable run in the submitting process itself: the task's event has the
    caller's tags and breadcrumbs once each, and the task's own tag stays out of the caller's scope."""
    sentry_sdk.set_tag("caller", "yes")
    sentry_sdk.add_breadcrumb(message="before")
    bound = bind_for_process(_tag_and_capture, ("in process",))
    unpack_result(bound())
    sentry_sdk.capture_message("caller after")
    event = sentry.by_message("in process")
    assert _tags(event) == {"caller": "yes", "task": "yes"}
    assert [c["message"] for c in event["breadcrumbs"]["values"]] == ["before"]
    assert _tags(sentry.by_message("caller after")) == {"caller": "yes"}
