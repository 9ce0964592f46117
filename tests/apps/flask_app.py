"""A Flask app as a user deploys it under gunicorn's gthread workers.

Telemetry is set up at import (``telemetry.setup``: ``ctxprop.init()`` and ``ctxprop.instrument()``).
``GET /work?rid=R`` sets the scope tag ``request_id``, opens a request span and does its work in a plain
``ThreadPoolExecutor`` (two tasks) and a plain ``threading.Thread``; each makes a child span ``work R VIA``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import telemetry
from flask import Flask, request
from opentelemetry import trace

telemetry.setup("flask-app")
tracer = trace.get_tracer("flask-app")
POOL = ThreadPoolExecutor(max_workers=4)
app = Flask(__name__)


def work(rid: str, via: str) -> None:
    with tracer.start_as_current_span(f"work {rid} {via}"):
        sum(range(1000))


@app.get("/health")
def health() -> dict[str, Any]:
    return {"pid": os.getpid()}


@app.get("/work")
def work_view() -> dict[str, Any]:
    rid = request.args["rid"]
    with telemetry.isolation_scope():
        telemetry.set_tag("request_id", rid)
        with tracer.start_as_current_span(f"request {rid}") as span:
            futures = [POOL.submit(work, rid, via) for via in ("pool-a", "pool-b")]
            thread = threading.Thread(target=work, args=(rid, "thread"))
            thread.start()
            for f in futures:
                f.result()
            thread.join()
            return {"rid": rid, "pid": os.getpid(), **telemetry.ids(span)}
