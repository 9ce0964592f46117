"""Type-checked by ``mypy --strict tests/typing``: the public signatures keep what callers rely on.

Not collected by pytest (no ``test_`` prefix); every statement is also valid at run time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from concurrent.futures import Future
from contextvars import Context
from typing import Any, assert_type

import ctxprop


# @worker, bare: the decorated signature survives (ParamSpec), sync and async.
@ctxprop.worker
def resize(image_id: int, *, scale: float = 1.0) -> str:
    return f"{image_id}@{scale}"


assert_type(resize(1, scale=0.5), str)


def _bad_calls() -> None:
    # Each line is a type error that the decorator must not hide.
    resize("one")  # type: ignore[arg-type]
    resize(1, scale="big")  # type: ignore[arg-type]
    resize(1, 2.0)  # type: ignore[call-arg]


# @worker(...) with options.
@ctxprop.worker(name="thumbnail", attributes={"size": 128})
def thumbnail(image_id: int) -> bytes:
    return b""


assert_type(thumbnail(3), bytes)


@ctxprop.worker
async def fetch(url: str) -> int:
    await asyncio.sleep(0)
    return len(url)


async def _use_fetch() -> None:
    result = await assert_type(fetch("x"), Coroutine[Any, Any, int])
    assert_type(result, int)


# capture / Snapshot / wrap.
snap = ctxprop.capture()
assert_type(snap, ctxprop.Snapshot)
assert_type(snap.run(resize, 2, scale=2.0), str)
assert_type(snap.context, Context)
assert_type(snap.isolation_tags, dict[str, ctxprop.AttrValue])


def _bad_snapshot_call() -> None:
    snap.run(resize, "two")  # type: ignore[arg-type]


wrapped = ctxprop.wrap(resize)
assert_type(wrapped(3), str)

# Scopes.
scope = ctxprop.get_isolation_scope()
assert_type(scope, ctxprop.Scope)
assert_type(scope.tags, Mapping[str, ctxprop.AttrValue])
assert_type(scope.fork(), ctxprop.Scope)
with ctxprop.isolation_scope() as iso:
    assert_type(iso, ctxprop.Scope)
with ctxprop.new_scope() as cur:
    assert_type(cur, ctxprop.Scope)

# Executors.
with ctxprop.ContextAwareThreadPoolExecutor(max_workers=1, thread_name_prefix="t") as pool:
    assert_type(pool.submit(resize, 4), Future[str])
    assert_type(list(pool.map(thumbnail, [1, 2])), list[bytes])


async def _helper() -> None:
    assert_type(await ctxprop.run_in_executor_with_context(None, None, thumbnail, 1), bytes)
    assert_type(await ctxprop.run_in_executor_with_context(None, pool, resize, 1, scale=3.0), str)
    await ctxprop.run_in_executor_with_context(None, None, thumbnail, "1")  # type: ignore[arg-type]


def _bad_submit() -> None:
    pool.submit(resize, "4")  # type: ignore[arg-type]
