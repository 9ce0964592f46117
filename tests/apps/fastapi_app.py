"""A FastAPI app with a sync endpoint, which FastAPI runs in anyio's worker-thread pool.

Telemetry is set up at import (``telemetry.setup``). A pure ASGI middleware opens an isolation scope per
request and sets the scope tag ``request_id`` from the query; FastAPI's own OpenTelemetry spans (its
server span ``GET /work`` and ``fastapi.dependencies``/``endpoint``/``serialization`` under it) do the
rest. The sync endpoint, running under ``fastapi.endpoint``, makes a child span ``work R endpoint`` in
anyio's thread and one ``work R pool`` in a plain ``ThreadPoolExecutor``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs

import telemetry
from fastapi import FastAPI
from opentelemetry import trace

telemetry.setup("fastapi-app")
tracer = trace.get_tracer("fastapi-app")
POOL = ThreadPoolExecutor(max_workers=2)
# The test's readiness polls of /health make no spans: the test counts every span that arrives.
api = FastAPI(telemetry={"exclude": lambda scope: scope["path"] == "/health"})

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def work(rid: str, via: str) -> None:
    with tracer.start_as_current_span(f"work {rid} {via}"):
        sum(range(1000))


@api.get("/health")
def health() -> dict[str, Any]:
    return {"pid": os.getpid()}


@api.get("/work")
def work_endpoint(rid: str) -> dict[str, Any]:
    endpoint_span = trace.get_current_span()
    work(rid, "endpoint")
    POOL.submit(work, rid, "pool").result()
    return {"rid": rid, "pid": os.getpid(), **telemetry.ids(endpoint_span)}


class RequestTags:
    """Pure ASGI middleware: each HTTP request in its own isolation scope, tagged with its rid."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = parse_qs(scope["query_string"].decode()).get("rid", [""])[0]
        with telemetry.isolation_scope():
            if rid:
                telemetry.set_tag("request_id", rid)
            await self.app(scope, receive, send)


# Outside FastAPI, so its server span (started before any add_middleware() middleware runs) has the tag too.
app = RequestTags(api)
