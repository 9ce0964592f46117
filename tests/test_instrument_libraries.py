"""instrument() beyond concurrent.futures: multiprocessing Pool and ThreadPool, joblib.Parallel (loky,
threading, multiprocessing backends), InterpreterPoolExecutor (3.14+); exact undo, and libraries
imported after instrument(). Each check also runs uninstrumented, as the control that fails it."""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from executor_tasks import failing, traced
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import run_child

import ctxprop

joblib = pytest.importorskip("joblib")

TAGS = {"tenant": "acme"}


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    """A pipeline exporting to memory."""
    exp = InMemorySpanExporter()
    ctxprop.init(exporter=exp, service_name="libraries", handle_signals=False)
    return exp


@pytest.fixture(scope="module")
def mp_pools() -> Iterator[dict[str, multiprocessing.pool.Pool]]:
    """A ThreadPool and a forkserver process Pool, two workers each, for the module."""
    pools = {
        "thread": multiprocessing.pool.ThreadPool(2),
        "process": multiprocessing.get_context("forkserver").Pool(2),
    }
    yield pools
    for pool in pools.values():
        pool.close()
        pool.join()


def under_root(run: Callable[[], Any]) -> tuple[Any, ReadableSpan | None, BaseException | None]:
    """``run()`` in a fresh isolation scope tagged tenant=acme, inside a submitting span."""
    error = None
    with ctxprop.isolation_scope():
        ctxprop.set_tag("tenant", "acme")
        with trace.get_tracer("test").start_as_current_span("submit") as root:
            try:
                out = run()
            except LookupError as exc:
                out, error = None, exc
    return out, root, error  # type: ignore[return-value]


def children(exporter: InMemorySpanExporter, root: Any) -> Counter[str]:
    """Names of the delivered spans that are children of ``root`` and carry its tag, counted."""
    ctxprop.flush(10)
    sc = root.get_span_context()
    return Counter(
        s.name
        for s in exporter.get_finished_spans()
        if s.parent is not None
        and s.parent.span_id == sc.span_id
        and s.attributes is not None
        and s.attributes.get("tenant") == "acme"
    )


def pool_calls(pool: multiprocessing.pool.Pool) -> list[Any]:
    """Every task-taking method of a multiprocessing pool, once each (the n values are 1..8)."""
    return [
        pool.apply(traced, (1,)),
        pool.apply_async(traced, (2,)).get(60),
        *pool.map(traced, [3]),
        *pool.map_async(traced, [4]).get(60),
        *pool.imap(traced, [5]),
        *pool.imap_unordered(traced, [6]),
        *pool.starmap(traced, [(7, 0)]),
        *pool.starmap_async(traced, [(8, 0)]).get(60),
    ]


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_multiprocessing_pools_carry_context_under_instrument(
    kind: str, mp_pools: dict[str, multiprocessing.pool.Pool], exporter: InMemorySpanExporter
) -> None:
    """apply, apply_async, map, map_async, imap, imap_unordered, starmap, starmap_async: tags in every
    task, spans children of the submitting span, once; results and the exception as uninstrumented."""
    pool = mp_pools[kind]
    bare, bare_root, _ = under_root(lambda: pool_calls(pool))
    _, _, bare_error = under_root(lambda: pool.apply(failing, (9,)))
    assert {r["n"]: r["tags"] for r in bare} != dict.fromkeys(range(1, 9), TAGS)  # the control fails
    assert children(exporter, bare_root) != Counter(f"task-{n}" for n in range(1, 9))
    ctxprop.instrument()
    try:
        seen, root, _ = under_root(lambda: pool_calls(pool))
        _, err_root, error = under_root(lambda: pool.apply(failing, (9,)))
    finally:
        ctxprop.uninstrument()
    assert [r["n"] for r in seen] == [r["n"] for r in bare] == list(range(1, 9))
    assert all(r["tags"] == TAGS for r in seen), seen
    assert children(exporter, root) == Counter(f"task-{n}" for n in range(1, 9))
    assert type(error) is type(bare_error)
    assert error is not None
    assert bare_error is not None
    assert error.args == bare_error.args
    assert children(exporter, err_root) == Counter(["doomed"])


@pytest.mark.parametrize("backend", ["loky", "threading", "multiprocessing"])
def test_joblib_parallel_carries_context_on_every_backend(
    backend: str, exporter: InMemorySpanExporter
) -> None:
    """``joblib.Parallel(backend=...)``: tags in every task, spans children of the submitting span, once;
    results and the task's exception as without instrument()."""
    delayed = joblib.delayed

    def run() -> list[Any]:
        out: list[Any] = joblib.Parallel(n_jobs=2, backend=backend)(delayed(traced)(n) for n in range(1, 5))
        return out

    def fail() -> None:
        joblib.Parallel(n_jobs=2, backend=backend)([delayed(failing)(9)])

    bare, bare_root, _ = under_root(run)
    _, _, bare_error = under_root(fail)
    # The control fails: no tags (loky), or worker spans not home as children (threading: orphans; the
    # multiprocessing backend forks its workers, which inherit the tags but keep their spans).
    assert any(r["tags"] != TAGS for r in bare) or children(exporter, bare_root) != Counter(
        f"task-{n}" for n in range(1, 5)
    )
    ctxprop.instrument()
    try:
        seen, root, _ = under_root(run)
        _, err_root, error = under_root(fail)
    finally:
        ctxprop.uninstrument()
    assert [r["n"] for r in seen] == [r["n"] for r in bare] == [1, 2, 3, 4]
    assert all(r["tags"] == TAGS for r in seen), seen
    assert children(exporter, root) == Counter(f"task-{n}" for n in range(1, 5))
    assert type(error) is type(bare_error)
    assert error is not None
    assert bare_error is not None
    assert error.args == bare_error.args
    assert children(exporter, err_root) == Counter(["doomed"])


def _patched_attributes() -> dict[str, Any]:
    import distributed
    import loky.process_executor

    found: dict[str, Any] = {
        f"Pool.{name}": multiprocessing.pool.Pool.__dict__[name]
        for name in ("apply_async", "map", "map_async", "starmap", "starmap_async", "imap", "imap_unordered")
    }
    found["Parallel.__call__"] = joblib.Parallel.__dict__["__call__"]
    found["Client.submit"] = distributed.Client.__dict__["submit"]
    found["Client.map"] = distributed.Client.__dict__["map"]
    found["loky.submit"] = loky.process_executor.ProcessPoolExecutor.__dict__["submit"]
    return found


def test_uninstrument_restores_every_library_patch_exactly() -> None:
    """Each library method instrument() patches is a wrapt proxy while instrumented and the very original
    object (``is``) after uninstrument(); instrument() twice patches once."""
    pytest.importorskip("distributed")
    import wrapt

    originals = _patched_attributes()
    ctxprop.instrument()
    ctxprop.instrument()
    try:
        patched = _patched_attributes()
        for name, value in patched.items():
            assert isinstance(value, wrapt.FunctionWrapper), name
            assert value.__wrapped__ is originals[name], name  # wrapped once, not twice
    finally:
        ctxprop.uninstrument()
    assert all(_patched_attributes()[name] is originals[name] for name in originals)


def test_a_library_imported_after_instrument_is_patched_then_restored() -> None:
    """instrument() imports none of joblib, loky or distributed; one imported later is patched on import,
    and uninstrument() restores it."""
    result = run_child(
        """
        import json, sys, ctxprop
        ctxprop.instrument()
        before = sorted(m for m in ("joblib", "loky", "distributed") if m in sys.modules)
        import joblib, wrapt
        original = joblib.Parallel.__dict__["__call__"]
        patched = isinstance(original, wrapt.FunctionWrapper)
        ctxprop.uninstrument()
        restored = joblib.Parallel.__dict__["__call__"] is original.__wrapped__
        print(json.dumps({"before": before, "patched": patched, "restored": restored}))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.json_lines == [{"before": [], "patched": True, "restored": True}]


@pytest.mark.skipif(sys.version_info < (3, 14), reason="InterpreterPoolExecutor is new in Python 3.14")
def test_interpreter_pool_executor_gets_the_envelope_every_way_in() -> None:
    """InterpreterPoolExecutor (tasks pickled into other interpreters): under instrument(), through
    ContextAwareExecutor and run_in_executor_with_context, tags reach the task and its spans come home
    as children of the submitting span, once; the bare pool (the control) carries nothing."""
    result = run_child(
        """
        import asyncio, json
        from collections import Counter
        from concurrent.futures import InterpreterPoolExecutor
        from opentelemetry import trace
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        import ctxprop
        from executor_tasks import traced, failing

        exp = InMemorySpanExporter()
        ctxprop.init(exporter=exp, handle_signals=False)
        out = {}
        with trace.get_tracer("t").start_as_current_span("submit") as root:
            ctxprop.set_tag("tenant", "acme")
            with InterpreterPoolExecutor(2) as pool:
                out["bare"] = pool.submit(traced, 1).result(60)["tags"]
                try:
                    pool.submit(failing, 1).result(60)
                except LookupError as exc:
                    out["bare_error"] = [type(exc.__cause__).__name__, *exc.args]
                wrapped = ctxprop.ContextAwareExecutor(pool)
                out["executor"] = [r["tags"] for r in [wrapped.submit(traced, 2).result(60),
                                                       *wrapped.map(traced, [3, 4], timeout=60)]]
                try:
                    wrapped.submit(failing, 5).result(60)
                except LookupError as exc:
                    out["error"] = [type(exc.__cause__).__name__, *exc.args]

                async def main():
                    return await ctxprop.run_in_executor_with_context(None, pool, traced, 6)

                out["run_in_executor"] = asyncio.run(main())["tags"]
                ctxprop.instrument()
                out["instrument"] = pool.submit(traced, 7).result(60)["tags"]
                ctxprop.uninstrument()
        ctxprop.flush(10)
        sid = root.get_span_context().span_id
        out["children"] = dict(Counter(s.name for s in exp.get_finished_spans()
                                       if s.parent is not None and s.parent.span_id == sid
                                       and s.attributes.get("tenant") == "acme"))
        print(json.dumps(out))
        """,
        env={"PYTHONPATH": str(__import__("support").REPO / "tests")},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.json_lines[-1]
    assert out["bare"] == {}  # the control
    assert out["executor"] == [TAGS, TAGS, TAGS]
    assert out["run_in_executor"] == TAGS
    assert out["instrument"] == TAGS
    assert out["error"][0] == out["bare_error"][0]
    assert out["error"][1:] == ["no row 5"]
    assert out["children"] == {f"task-{n}": 1 for n in (2, 3, 4, 6, 7)} | {"doomed": 1}
