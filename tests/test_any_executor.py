"""Every executor, every way in: ContextAwareExecutor, run_in_executor_with_context and instrument() over
a thread pool, a process pool, loky and Dask distributed (LocalCluster with worker processes).

Each way is checked against the bare executor run by the same code: tags seen in the task, worker spans
parented to the submitting span and delivered exactly once, and results, exceptions, ``map``'s order and
``timeout``, and cancellation as the bare executor gives them. The bare run is the control: it fails the
context checks, so these tests can fail.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import multiprocessing
import os
import pickle
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import OTLPReceiver, receiver  # noqa: F401

import ctxprop

loky = pytest.importorskip("loky")
distributed = pytest.importorskip("distributed")

EXECUTORS = ["thread", "process", "loky", "dask"]
WAYS = ["executor", "run_in_executor", "instrument"]
TAGS = {"tenant": "acme"}


# --- tasks (module level: the workers import them by name) -------------------------------------------------


def tags_here() -> dict[str, Any]:
    return {**ctxprop.get_isolation_scope().tags, **ctxprop.get_current_scope().tags}


def traced(n: int) -> dict[str, Any]:
    """Makes a span, reports the tags it saw."""
    with trace.get_tracer("worker").start_as_current_span(f"task-{n}"):
        ctxprop.set_tag("written_by_task", n)  # must reach neither the submitter nor a later task
        return {"n": n, "tags": {k: v for k, v in tags_here().items() if k != "written_by_task"}}


def failing(n: int) -> None:
    with trace.get_tracer("worker").start_as_current_span("doomed"):
        raise LookupError(f"no row {n}")


def blocked(event: Any) -> str:
    event.wait(60)
    return "released"


def worker_client_ready() -> str:
    """Makes the worker's own Dask client (a ``distributed.Event`` waits through it) and names the worker."""
    distributed.get_client()
    return str(distributed.get_worker().address)


def profiler_enabled() -> bool:
    import dask

    return bool(dask.config.get("distributed.worker.profile.enabled"))


# --- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Any]:
    """One Dask LocalCluster with two single-threaded worker processes for the whole module."""
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=50
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        # Each worker makes its own client the first time a task needs one, and two tasks needing it at
        # once can read the scheduler's handshake reply batched with the next message (Dask asserts and
        # the task fails, with or without ctxprop). Make them here, once, one task pinned to each worker.
        workers = sorted(client.scheduler_info()["workers"])
        ready = [client.submit(worker_client_ready, workers=[w], pure=False) for w in workers]
        assert sorted(f.result(timeout=60) for f in ready) == workers
        yield client


@pytest.fixture(scope="module")
def manager() -> Iterator[Any]:
    """A multiprocessing manager, for events that process-pool and loky tasks can wait on."""
    with multiprocessing.get_context("spawn").Manager() as mgr:
        yield mgr


@pytest.fixture(scope="module")
def pools() -> Iterator[dict[str, Executor]]:
    """A thread pool, a forkserver process pool and a loky executor, two workers each, for the module."""
    made: dict[str, Executor] = {
        "thread": ThreadPoolExecutor(max_workers=2),
        "process": ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("forkserver")),
        "loky": loky.get_reusable_executor(max_workers=2),
    }
    yield made
    for pool in made.values():
        pool.shutdown(wait=True)


@pytest.fixture
def make_executor(pools: dict[str, Executor], request: pytest.FixtureRequest) -> Callable[[str], Executor]:
    """The bare executor of a kind (Dask's from ``client.get_executor()``, made per test)."""

    def make(kind: str) -> Executor:
        if kind == "dask":
            client = request.getfixturevalue("dask_client")
            executor: Executor = client.get_executor()
            return executor
        return pools[kind]

    return make


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    """A pipeline exporting to memory."""
    exp = InMemorySpanExporter()
    ctxprop.init(exporter=exp, service_name="any-executor", handle_signals=False)
    return exp


@pytest.fixture
def instrumented() -> Iterator[None]:
    """instrument() for the test, undone after it."""
    ctxprop.instrument()
    try:
        yield
    finally:
        ctxprop.uninstrument()


# --- one way in, driven the same for every executor ---------------------------------------------------------


class Way:
    """Submit one call, map over items, as a user of one way in would."""

    def __init__(self, name: str, executor: Executor) -> None:
        self.name = name
        self.executor: Executor = ctxprop.ContextAwareExecutor(executor) if name == "executor" else executor

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.name == "run_in_executor":
            return asyncio.run(self._async_call(fn, *args))
        return self.executor.submit(fn, *args).result(timeout=60)

    async def _async_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await ctxprop.run_in_executor_with_context(None, self.executor, fn, *args)

    def map(self, fn: Callable[..., Any], items: list[Any]) -> list[Any]:
        if self.name == "run_in_executor":

            async def all_of() -> list[Any]:
                return list(await asyncio.gather(*(self._async_call(fn, i) for i in items)))

            return asyncio.run(all_of())
        return list(self.executor.map(fn, items, timeout=60))


@dataclass
class Observed:
    """What one run of the scenario saw."""

    results: list[dict[str, Any]]
    error: BaseException
    root: ReadableSpan
    spans: list[ReadableSpan]
    submitter_tags: dict[str, Any]


def scenario(way: Way, exporter: InMemorySpanExporter) -> Observed:
    """Under a submitting span with a tag: one call, a map, a failing call; then flush."""
    with ctxprop.isolation_scope():
        ctxprop.set_tag("tenant", "acme")
        with trace.get_tracer("test").start_as_current_span("submit"):
            results = [way.call(traced, 1), *way.map(traced, [3, 4, 2])]
            try:
                way.call(failing, 7)
            except LookupError as exc:
                error: BaseException = exc
            else:
                pytest.fail("the task's exception did not reach the caller")
            submitter_tags = tags_here()
    ctxprop.flush(10)
    spans = list(exporter.get_finished_spans())
    root = next(s for s in spans if s.name == "submit")
    return Observed(results, error, root, [s for s in spans if s.name != "submit"], submitter_tags)


def context_failures(seen: Observed) -> list[str]:
    """Every way the context failed to cross (empty: it all did)."""
    failures = []
    if any(r["tags"] != TAGS for r in seen.results):
        failures.append(f"tags seen in tasks: {[r['tags'] for r in seen.results]}")
    root = seen.root.get_span_context()
    # (a bare run's spans may sit in a worker's collector and ride home with a later task: not this trace's)
    names = Counter(s.name for s in seen.spans if s.context.trace_id == root.trace_id)
    if names != Counter({"task-1": 1, "task-2": 1, "task-3": 1, "task-4": 1, "doomed": 1}):
        failures.append(f"worker spans delivered: {dict(names)}")
    for span in seen.spans:
        if span.context.trace_id != root.trace_id and span.name in names:
            continue
        parent = span.parent
        if parent is None or parent.span_id != root.span_id or span.context.trace_id != root.trace_id:
            failures.append(f"{span.name} is not a child of the submitting span")
        if span.attributes is None or span.attributes.get("tenant") != "acme":
            failures.append(f"{span.name} lacks the submitter's tag")
    return failures


def run_bare(make_executor: Callable[[str], Executor], kind: str) -> Observed:
    exp = InMemorySpanExporter()
    ctxprop.init(exporter=exp, service_name="any-executor", handle_signals=False)
    try:
        return scenario(Way("bare", make_executor(kind)), exp)
    finally:
        ctxprop.close()


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("kind", EXECUTORS)
def test_context_crosses_and_outcomes_match_the_bare_executor(
    kind: str, way: str, make_executor: Callable[[str], Executor]
) -> None:
    """Tags reach every task, worker spans are children of the submitting span and arrive once; results,
    map order and exceptions are the bare executor's; the bare executor itself fails the context checks."""
    bare = run_bare(make_executor, kind)
    assert context_failures(bare), "the control passed: this test could not fail"
    exp = InMemorySpanExporter()
    ctxprop.init(exporter=exp, service_name="any-executor", handle_signals=False)
    if way == "instrument":
        ctxprop.instrument()
    try:
        seen = scenario(Way(way, make_executor(kind)), exp)
    finally:
        ctxprop.uninstrument()
    assert context_failures(seen) == []
    assert [r["n"] for r in seen.results] == [r["n"] for r in bare.results] == [1, 3, 4, 2]
    assert type(seen.error) is type(bare.error)
    assert seen.error.args == bare.error.args
    assert type(seen.error.__cause__) is type(bare.error.__cause__)
    assert seen.submitter_tags == TAGS  # nothing a task set came back


# --- the two errors of the issue, before ctxprop carried the envelope ---------------------------------------


@pytest.mark.parametrize("kind", ["loky", "dask"])
def test_run_in_executor_with_context_no_longer_fails_to_pickle(
    kind: str, make_executor: Callable[[str], Executor], exporter: InMemorySpanExporter
) -> None:
    """loky used to fail with "Could not pickle the task", Dask's executor with "cannot pickle
    '_contextvars.Context' object": the call now returns the task's value, with the tags."""
    ctxprop.set_tag("tenant", "acme")

    async def main() -> dict[str, Any]:
        return await ctxprop.run_in_executor_with_context(None, make_executor(kind), traced, 5)

    assert asyncio.run(main()) == {"n": 5, "tags": TAGS}


# --- cancellation and map's timeout -------------------------------------------------------------------------


def _event(kind: str, manager: Any, request: pytest.FixtureRequest) -> Any:
    if kind == "thread":
        return threading.Event()
    if kind == "dask":
        client = request.getfixturevalue("dask_client")
        return distributed.Event(f"release-{os.urandom(4).hex()}", client=client)
    return manager.Event()


@pytest.mark.parametrize("way", ["bare", "executor", "instrument"])
@pytest.mark.parametrize("kind", EXECUTORS)
def test_cancelling_a_queued_task_and_map_timeout_behave_as_on_the_bare_executor(
    kind: str,
    way: str,
    make_executor: Callable[[str], Executor],
    manager: Any,
    request: pytest.FixtureRequest,
) -> None:
    """With every worker held, a queued task cancels (True, then CancelledError) and ``map`` with a
    ``timeout`` raises TimeoutError, exactly as the bare executor does; held tasks finish once released."""
    bare = make_executor(kind)
    executor: Executor = ctxprop.ContextAwareExecutor(bare) if way == "executor" else bare
    if way == "instrument":
        ctxprop.instrument()
    event = _event(kind, manager, request)
    try:
        holders = [executor.submit(blocked, event) for _ in range(6)]
        queued = executor.submit(traced, 9)
        assert type(queued) is Future or isinstance(queued, Future)
        assert queued.cancel() is True
        assert queued.cancelled()
        with pytest.raises(concurrent.futures.CancelledError):
            queued.result(timeout=10)
        results = executor.map(blocked, [event], timeout=0.2)
        with pytest.raises(TimeoutError):
            next(iter(results))
    finally:
        event.set()
        ctxprop.uninstrument()
    assert [h.result(timeout=60) for h in holders] == ["released"] * 6


# --- pickled wrap() and Snapshot ----------------------------------------------------------------------------


def test_a_pickled_wrap_becomes_the_envelope(exporter: InMemorySpanExporter) -> None:
    """``pickle.dumps(ctxprop.wrap(fn))`` used to fail on the Context; it now carries trace context and
    tags, and the unpickled callable runs with them (here, in the submitting process itself)."""
    ctxprop.set_tag("tenant", "acme")
    with trace.get_tracer("test").start_as_current_span("submit") as root:
        blob = pickle.dumps(ctxprop.wrap(traced))
        snap_blob = pickle.dumps(ctxprop.capture())
    assert ctxprop.get_isolation_scope().tags == TAGS
    with ctxprop.isolation_scope():
        ctxprop.get_isolation_scope().remove_tag("tenant")
        assert pickle.loads(blob)(4) == {"n": 4, "tags": TAGS}  # noqa: S301 - our own bytes
        assert pickle.loads(snap_blob).run(traced, 6) == {"n": 6, "tags": TAGS}  # noqa: S301
    ctxprop.flush(5)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    for name in ("task-4", "task-6"):
        parent = spans[name].parent
        assert parent is not None
        assert parent.span_id == root.get_span_context().span_id


@pytest.mark.parametrize("kind", ["process", "loky", "dask"])
def test_wrapped_callables_and_bound_snapshots_cross_to_workers(
    kind: str, make_executor: Callable[[str], Executor], exporter: InMemorySpanExporter
) -> None:
    """``executor.submit(ctxprop.wrap(fn))`` and ``submit(snapshot.run, fn)`` on executors that pickle
    (Dask's failed with "cannot pickle '_contextvars.Context' object"): tags seen, spans parented, once."""
    executor = make_executor(kind)
    ctxprop.set_tag("tenant", "acme")
    with trace.get_tracer("test").start_as_current_span("submit") as root:
        first = executor.submit(ctxprop.wrap(traced), 11).result(timeout=60)
        second = executor.submit(ctxprop.capture().run, traced, 12).result(timeout=60)
    assert first == {"n": 11, "tags": TAGS}
    assert second == {"n": 12, "tags": TAGS}
    ctxprop.flush(10)
    trace_id = root.get_span_context().trace_id
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    spans = [s for s in spans if s.name != "submit"]
    assert sorted(s.name for s in spans) == ["task-11", "task-12"]
    for span in spans:
        assert span.parent is not None
        assert span.parent.span_id == root.get_span_context().span_id


def test_wrap_still_binds_as_a_method() -> None:
    """A ``wrap()``-ed function stored on a class binds ``self`` as the function would."""

    class Job:
        def __init__(self) -> None:
            self.n = 3

        def run(self, k: int) -> int:
            return self.n * k

    Job.bound = ctxprop.wrap(Job.run)  # type: ignore[attr-defined]
    assert Job().bound(2) == 6  # type: ignore[attr-defined]
    assert Job.bound.__wrapped__ is Job.run  # type: ignore[attr-defined]


# --- Dask: Client.submit/map under instrument(), and workers with a pipeline of their own -------------------


def passthrough(value: Any) -> Any:
    return value


def test_dask_client_submit_and_map_under_instrument_deliver_once(
    dask_client: Any, exporter: InMemorySpanExporter
) -> None:
    """``Client.submit``/``map`` under instrument(): tags in the task, spans children of the submitting span;
    ``result()`` twice delivers them once; a dependent task gets the value itself. Without instrument()
    (the control) the tags are missing and no worker span arrives."""

    def run() -> tuple[Any, ...]:
        with ctxprop.isolation_scope():
            ctxprop.set_tag("tenant", "acme")
            with trace.get_tracer("test").start_as_current_span("submit") as root:
                first = dask_client.submit(traced, 21)
                again = (first.result(timeout=60), first.result(timeout=60))
                mapped = dask_client.gather(dask_client.map(traced, [22, 23]))
                dependent = dask_client.submit(passthrough, first).result(timeout=60)
        ctxprop.flush(10)
        sc = root.get_span_context()
        names = Counter(
            s.name
            for s in exporter.get_finished_spans()
            if s.parent is not None
            and s.parent.span_id == sc.span_id
            and (s.attributes or {}).get("tenant") == "acme"
        )
        return again, mapped, dependent, names

    again, mapped, dependent, names = run()
    assert [r["tags"] for r in (*again, *mapped)] == [{}] * 4  # the control
    assert names == Counter()
    ctxprop.instrument()
    try:
        again, mapped, dependent, names = run()
    finally:
        ctxprop.uninstrument()
    assert again == ({"n": 21, "tags": TAGS},) * 2
    assert mapped == [{"n": 22, "tags": TAGS}, {"n": 23, "tags": TAGS}]
    assert dependent == {"n": 21, "tags": TAGS}
    assert names == Counter(["task-21", "task-22", "task-23"])


def test_with_the_worker_plugin_spans_go_out_through_the_workers_pipeline(
    dask_client: Any, exporter: InMemorySpanExporter, receiver: OTLPReceiver  # noqa: F811
) -> None:
    """With ``CtxpropWorkerPlugin`` registered, each worker runs its own pipeline: the task spans reach
    the collector from the workers, parented and tagged, and none rides home to the client (never twice).
    Unregistered, the workers ship spans home again."""
    plugin = ctxprop.CtxpropWorkerPlugin(endpoint=receiver.endpoint, service_name="dask-worker")
    dask_client.register_plugin(plugin)
    executor = ctxprop.ContextAwareExecutor(dask_client.get_executor())
    try:
        ctxprop.set_tag("tenant", "acme")
        with trace.get_tracer("test").start_as_current_span("submit") as root:
            results = list(executor.map(traced, [31, 32, 33], timeout=60))
        # The workers close their pipelines (flushing) when the plugin is removed.
    finally:
        dask_client.unregister_worker_plugin(plugin.name)
    assert [r["tags"] for r in results] == [TAGS] * 3
    assert receiver.wait_for_spans(3, timeout=30)
    sc = root.get_span_context()
    got = {s.name: s for s in receiver.spans}
    assert sorted(got) == ["task-31", "task-32", "task-33"]
    for span in got.values():
        assert span.parent_span_id == format(sc.span_id, "016x")
        assert span.trace_id == format(sc.trace_id, "032x")
        assert span.attributes["tenant"] == "acme"
        assert span.service_name == "dask-worker"
    ctxprop.flush(10)
    assert not [s for s in exporter.get_finished_spans() if s.name.startswith("task-3")]
    with trace.get_tracer("test").start_as_current_span("after") as after:
        assert executor.submit(traced, 34).result(timeout=60)["tags"] == TAGS
    ctxprop.flush(10)
    home = [s for s in exporter.get_finished_spans() if s.name == "task-34"]
    assert len(home) == 1
    assert home[0].parent is not None
    assert home[0].parent.span_id == after.get_span_context().span_id


def test_dask_profiler_is_off_on_free_threaded_builds(dask_client: Any) -> None:
    """Dask's profiler reads another thread's frames, which crashes a free-threaded interpreter
    (python/cpython#152355); conftest switches it off there, in this process and in every worker."""
    import dask
    from conftest import FREE_THREADED

    on_workers = set(dask_client.run(profiler_enabled).values())
    if FREE_THREADED:
        assert on_workers == {False}
        assert dask.config.get("distributed.worker.profile.enabled") is False
    else:
        assert on_workers == {True}  # untouched where it is safe


def own_pipeline(endpoint: str) -> None:
    """A process pool's initializer: this worker runs a pipeline of its own."""
    ctxprop.init(endpoint=endpoint, service_name="pool-worker", handle_signals=False)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_a_plain_pool_whose_initializer_calls_init_sends_the_task_spans_itself(
    method: str, exporter: InMemorySpanExporter, receiver: OTLPReceiver  # noqa: F811
) -> None:
    """``ctxprop.init()`` in a plain ``ProcessPoolExecutor``'s initializer, every start method: each task
    span leaves through the worker's own pipeline (its service name), parented to the submitting span,
    once; none rides home. A forked worker's init() used to warn "already called in this process" and
    keep the pipeline it inherited, so its spans went home under the parent's name."""
    pool = ProcessPoolExecutor(
        max_workers=2,
        mp_context=multiprocessing.get_context(method),
        initializer=own_pipeline,
        initargs=(receiver.endpoint,),
    )
    with (
        ctxprop.ContextAwareExecutor(pool) as executor,
        trace.get_tracer("test").start_as_current_span("submit") as root,
    ):
        assert [r["n"] for r in executor.map(traced, [1, 2, 3, 4])] == [1, 2, 3, 4]
    assert receiver.wait_for_spans(4, timeout=30)
    sid = format(root.get_span_context().span_id, "016x")
    spans = receiver.spans
    assert sorted(s.name for s in spans) == ["task-1", "task-2", "task-3", "task-4"]
    assert {s.service_name for s in spans} == {"pool-worker"}
    assert {s.parent_span_id for s in spans} == {sid}
    ctxprop.flush(10)
    assert [s.name for s in exporter.get_finished_spans()] == ["submit"]


# --- executors ctxprop knows nothing about ------------------------------------------------------------------

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def request_and_tags(n: int) -> dict[str, Any]:
    return {"n": n, "request_id": REQUEST_ID.get(), "tags": tags_here()}


class Inline(Executor):
    """An executor of no known kind that runs each task in the calling thread."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


class Delegating(Executor):
    """An executor of no known kind whose tasks are pickled (it hands them to a process pool)."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self.inner.submit(fn, *args, **kwargs)


def test_an_unknown_executor_gets_the_context_whether_it_pickles_or_not(
    pools: dict[str, Executor], exporter: InMemorySpanExporter
) -> None:
    """For an executor of no known kind the task is bound to a snapshot: run in this process it sees the
    whole context (an application ContextVar too); pickled by the executor it becomes the envelope (tags and
    spans, no ContextVar). Bare, neither sees the tags (the control)."""
    token = REQUEST_ID.set("r-7")
    try:
        ctxprop.set_tag("tenant", "acme")
        inline = Inline()
        delegating = Delegating(pools["process"])
        with trace.get_tracer("test").start_as_current_span("submit") as root:
            bare = delegating.submit(request_and_tags, 0).result(timeout=60)
            in_process = ctxprop.ContextAwareExecutor(inline).submit(
                lambda: (ctxprop.set_tag("tenant", "other"), request_and_tags(1))[1]
            ).result()
            pickled = ctxprop.ContextAwareExecutor(delegating).submit(traced, 2).result(timeout=60)
            wrapped = ctxprop.ContextAwareExecutor(delegating)
            pickled_ctx = wrapped.submit(request_and_tags, 3).result(timeout=60)
    finally:
        REQUEST_ID.reset(token)
    assert bare["tags"].get("tenant") is None  # the control (a bare worker keeps stale tags of its own)
    assert in_process == {"n": 1, "request_id": "r-7", "tags": {"tenant": "other"}}
    assert ctxprop.get_isolation_scope().tags == TAGS  # the task's tag write stayed in the task
    assert pickled == {"n": 2, "tags": TAGS}
    assert pickled_ctx == {"n": 3, "request_id": "-", "tags": TAGS}
    ctxprop.flush(10)
    sc = root.get_span_context()
    spans = [s for s in exporter.get_finished_spans() if s.name == "task-2"]
    assert len(spans) == 1
    assert spans[0].parent is not None
    assert spans[0].parent.span_id == sc.span_id
