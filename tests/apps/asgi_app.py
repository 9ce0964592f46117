"""A bare ASGI app as a user deploys it under uvicorn or gunicorn's UvicornWorker.

Telemetry is set up at import (``telemetry.setup``), or with ``APP_INIT=post_fork`` in each gunicorn
worker by ``gunicorn_conf.py``'s ``post_fork`` hook. ``GET /work?rid=R`` opens a request span, sets the
scope tag ``request_id`` and does one piece of work in each of: a plain ``ThreadPoolExecutor`` through
``loop.run_in_executor``, ``asyncio.to_thread``, and asgiref's ``sync_to_async``. Each piece makes a child
span ``work R VIA``. ``GET /health`` answers with the worker's pid.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs

import telemetry
from asgiref.sync import sync_to_async
from opentelemetry import trace

if os.environ.get("APP_INIT") != "post_fork":  # else gunicorn_conf.py's post_fork hook sets it up
    telemetry.setup("asgi-app")
tracer = trace.get_tracer("asgi-app")
POOL = ThreadPoolExecutor(max_workers=4)
VIAS = ("pool", "to_thread", "sync_to_async")


def work(rid: str, via: str) -> None:
    with tracer.start_as_current_span(f"work {rid} {via}"):
        sum(range(1000))


async def handle(rid: str) -> dict[str, Any]:
    with telemetry.isolation_scope():
        telemetry.set_tag("request_id", rid)
        return await traced(rid)


async def traced(rid: str) -> dict[str, Any]:
    with tracer.start_as_current_span(f"request {rid}") as span:
        await asyncio.get_running_loop().run_in_executor(POOL, work, rid, "pool")
        await asyncio.to_thread(work, rid, "to_thread")
        await sync_to_async(work)(rid, "sync_to_async")
        return {"rid": rid, "pid": os.getpid(), **telemetry.ids(span)}


async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/work":
        rid = parse_qs(scope["query_string"].decode())["rid"][0]
        body = await handle(rid)
    else:
        body = {"pid": os.getpid()}
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})
