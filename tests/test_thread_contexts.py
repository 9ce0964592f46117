"""instrument() and the pools with 3.14's thread contexts: ``-X thread_inherit_context=0/1`` and an explicit
``Thread(context=...)``, in real interpreters started with each flag.

On interpreters before 3.14 the flag does not exist (``-X`` ignores it): the same expectations hold there,
and the ``context=`` cases are skipped.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from support import REPO, child_env

HAS_THREAD_CONTEXT = "context" in inspect.signature(threading.Thread).parameters

CHILD = """
import asyncio, contextvars, json, sys, threading
from concurrent.futures import ThreadPoolExecutor
import ctxprop

V = contextvars.ContextVar("v", default="-")
out = {"flag": bool(getattr(sys.flags, "thread_inherit_context", 0))}


def tags():
    return dict(ctxprop.get_isolation_scope().tags)


def seen():
    return {"v": V.get(), "tags": tags()}


def write():
    got = seen()
    V.set("written-in-thread")
    ctxprop.set_tag("written", True)
    return got


def in_thread(fn, **kw):
    box = []
    t = threading.Thread(target=lambda: box.append(fn()), **kw)
    t.start()
    t.join(30)
    return box[0]


ctxprop.instrument()
with ctxprop.isolation_scope():
    ctxprop.set_tag("job", "starter")
    V.set("starter")
    out["thread"] = in_thread(write)
    box = []
    timer = threading.Timer(0.0, lambda: box.append(seen()))
    timer.start()
    timer.join(30)
    out["timer"] = box[0]
    out["starter_after"] = seen()

    if "context" in {context_param!r}:
        explicit = contextvars.Context()
        explicit.run(V.set, "explicit")
        out["explicit"] = in_thread(write, context=explicit)
        out["explicit_after"] = explicit.run(V.get)
        out["starter_after_explicit"] = seen()

    init_seen = []
    pool = ThreadPoolExecutor(max_workers=1, initializer=lambda: init_seen.append(seen()))
    aware_init = []
    aware = ctxprop.ContextAwareThreadPoolExecutor(
        max_workers=1, initializer=lambda: aware_init.append(seen())
    )
    try:
        out["pool_task"] = pool.submit(write).result(30)
        out["aware_task"] = aware.submit(write).result(30)
    finally:
        pool.shutdown()
        aware.shutdown()
    out["pool_initializer"] = init_seen
    out["aware_initializer"] = aware_init

    async def main():
        return await asyncio.to_thread(write), seen()

    out["to_thread"], out["after_to_thread"] = asyncio.run(main())
    out["starter_end"] = seen()
print(json.dumps(out), flush=True)
"""

STARTER = {"v": "starter", "tags": {"job": "starter"}}
CLEAN = {"v": "-", "tags": {}}


def _run(tmp_path: Path, flag: int) -> dict[str, Any]:
    script = tmp_path / "threads.py"
    params = "context" if HAS_THREAD_CONTEXT else ""
    script.write_text(CHILD.replace("{context_param!r}", repr(params)))
    proc = subprocess.run(
        [sys.executable, "-X", f"thread_inherit_context={flag}", str(script)],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=str(REPO),
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("flag", [0, 1])
def test_threads_and_pools_propagate_with_either_inherit_flag(tmp_path: Path, flag: int) -> None:
    """Under instrument(), with thread_inherit_context off or on: a Thread, a Timer, pool tasks and
    asyncio.to_thread see the starter's ContextVar and tags, and nothing they write reaches the starter."""
    out = _run(tmp_path, flag)
    if HAS_THREAD_CONTEXT:
        assert out["flag"] is bool(flag)
    for key in ("thread", "timer", "pool_task", "aware_task", "to_thread"):
        assert out[key] == STARTER, key
    for key in ("starter_after", "after_to_thread", "starter_end"):
        assert out[key] == STARTER, key


@pytest.mark.parametrize("flag", [0, 1])
def test_pool_initializers_run_in_a_clean_context(tmp_path: Path, flag: int) -> None:
    """A plain pool's initializer (and a ContextAwareThreadPoolExecutor's) under instrument() sees none of
    the first submitter's context, even where new threads inherit their starter's context."""
    out = _run(tmp_path, flag)
    assert out["pool_initializer"] == [CLEAN]
    assert out["aware_initializer"] == [CLEAN]


@pytest.mark.skipif(not HAS_THREAD_CONTEXT, reason="Thread(context=...) is new in Python 3.14")
@pytest.mark.parametrize("flag", [0, 1])
def test_an_explicit_thread_context_is_respected(tmp_path: Path, flag: int) -> None:
    """Thread(context=ctx) under instrument() runs in ctx, as the caller asked: it sees ctx's values, not
    the starter's, and its writes land in ctx."""
    out = _run(tmp_path, flag)
    assert out["explicit"] == {"v": "explicit", "tags": {}}
    assert out["explicit_after"] == "written-in-thread"
    assert out["starter_after_explicit"] == STARTER
