"""Every ContextVar travels: fields bound with real structlog (``structlog.contextvars``) and loguru
(``logger.contextualize``) by the submitter appear in the log lines that thread tasks write; across a
process boundary, the scope tags travel and a three-line processor/patcher puts them in the lines.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import structlog
from loguru import logger
from structlog.testing import LogCapture
from support import run_child

import ctxprop


@pytest.fixture
def slog() -> Iterator[LogCapture]:
    """structlog configured to merge its contextvars into each event and keep the events in a list."""
    cap = LogCapture()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, cap])
    structlog.contextvars.clear_contextvars()
    try:
        yield cap
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.reset_defaults()
        ctxprop.uninstrument()


@pytest.fixture
def loguru_records() -> Iterator[list[dict[str, Any]]]:
    """A loguru sink keeping each record's message and extra fields."""
    records: list[dict[str, Any]] = []
    lock = threading.Lock()

    def sink(message: Any) -> None:
        with lock:
            records.append({"message": message.record["message"], **message.record["extra"]})

    handler = logger.add(sink, format="{message}")
    try:
        yield records
    finally:
        logger.remove(handler)
        ctxprop.uninstrument()


def _slog_task(label: str) -> None:
    structlog.get_logger().info(label)
    structlog.contextvars.bind_contextvars(leaked=label)  # must stay in this task


def _loguru_task(label: str) -> None:
    logger.info(label)


def _thread(fn: Callable[[str], None], label: str) -> None:
    t = threading.Thread(target=fn, args=(label,))
    t.start()
    t.join(30)


def _run_everywhere(fn: Callable[[str], None], *, aware: bool) -> None:
    """``fn`` in a plain pool task, a pool ``map``, a Thread, ``run_in_executor`` and ``to_thread``."""
    pool = ctxprop.ContextAwareThreadPoolExecutor(max_workers=2) if aware else ThreadPoolExecutor(2)
    with pool:
        pool.submit(fn, "submit").result(30)
        list(pool.map(fn, ["map"]))

        async def main() -> None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(pool, fn, "run_in_executor")
            await asyncio.to_thread(fn, "to_thread")

        asyncio.run(main())
    _thread(fn, "thread")


LABELS = ["submit", "map", "run_in_executor", "to_thread", "thread"]


@pytest.mark.parametrize("how", ["instrument", "ContextAwareThreadPoolExecutor"])
def test_structlog_fields_reach_thread_tasks_log_lines(slog: LogCapture, how: str) -> None:
    """Fields bound with structlog.contextvars.bind_contextvars appear in every line a pool task, a
    Thread, run_in_executor or to_thread writes; a task's own binding reaches neither the submitter nor
    the next task."""
    if how == "instrument":
        ctxprop.instrument()
    structlog.contextvars.bind_contextvars(request_id="r-1", user="ada")
    _run_everywhere(_slog_task, aware=how != "instrument")
    structlog.get_logger().info("submitter")
    by_event = {e["event"]: e for e in slog.entries}
    for label in LABELS:
        if label == "thread" and how != "instrument":
            continue  # a plain Thread needs instrument() (or ctxprop.wrap)
        assert by_event[label] == {"event": label, "log_level": "info", "request_id": "r-1", "user": "ada"}
    assert "leaked" not in by_event["submitter"]


def test_structlog_fields_are_lost_without_ctxprop(slog: LogCapture) -> None:
    """The control: a plain pool whose worker thread was started elsewhere writes lines without them."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(int).result(30)  # the worker thread starts in this (empty) context
        structlog.contextvars.bind_contextvars(request_id="r-1")
        pool.submit(_slog_task, "plain").result(30)
    (entry,) = slog.entries
    assert "request_id" not in entry


def test_loguru_contextualize_reaches_thread_tasks_log_lines(
    loguru_records: list[dict[str, Any]],
) -> None:
    """Fields of loguru's logger.contextualize() appear in every line a thread task writes under
    instrument(), and stop at the end of the with-block."""
    ctxprop.instrument()
    with logger.contextualize(request_id="r-2"):
        _run_everywhere(_loguru_task, aware=False)
    _loguru_task("after")
    by_message = {r["message"]: r for r in loguru_records}
    for label in LABELS:
        assert by_message[label] == {"message": label, "request_id": "r-2"}, label
    assert by_message["after"] == {"message": "after"}


PROCESS_CHILD = """
import contextvars, json, multiprocessing, sys
from concurrent.futures import ProcessPoolExecutor
import structlog
from loguru import logger
import ctxprop


def ctxprop_tags(_, __, event_dict):
    # The README's recipe: the scope tags (which do cross processes) into every structlog line.
    return {**ctxprop.get_isolation_scope().tags, **ctxprop.get_current_scope().tags, **event_dict}


def setup():
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, ctxprop_tags,
                                    structlog.processors.JSONRenderer()])
    logger.remove()
    logger.configure(patcher=lambda record: record["extra"].update(ctxprop.get_isolation_scope().tags))
    logger.add(sys.stdout, format="{message}", serialize=True)


def task(label):
    structlog.get_logger().info(label)
    logger.info(label)
    return label


def submit_from(pool, rid, label):
    # Each request in a context of its own, as a server runs them.
    def request():
        structlog.contextvars.bind_contextvars(bound=rid)
        ctxprop.set_tag("request_id", rid)
        with logger.contextualize(contextualized=rid):
            return pool.submit(task, label).result(30)

    return contextvars.Context().run(request)


if __name__ == "__main__":
    setup()
    ctxprop.instrument()
    ctx = multiprocessing.get_context("{method}")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=setup) as pool:
        submit_from(pool, "r-1", "plain-1")  # the worker is forked from this request's context
        submit_from(pool, "r-2", "plain-2")
    with ctxprop.ContextAwareProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=setup) as pool:
        submit_from(pool, "r-3", "aware-3")
        submit_from(pool, "r-4", "aware-4")
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_process_pool_log_lines_carry_the_scope_tags_and_nothing_stale(method: str) -> None:
    """Process-pool tasks (a plain pool under instrument(), ContextAwareProcessPoolExecutor; fork and
    spawn): the scope tags reach their structlog and loguru lines through the README's processor and
    patcher; structlog's contextvars and loguru's contextualize() fields stay in the submitting process,
    and a forked worker never shows the fields of the request it was forked from to later tasks."""
    result = run_child(PROCESS_CHILD.replace("{method}", method), timeout=90)
    assert result.returncode == 0, result.stderr
    slog = {ln["event"]: ln for ln in result.json_lines if "event" in ln}
    lines = {ln["record"]["message"]: ln["record"]["extra"] for ln in result.json_lines if "record" in ln}
    for label, rid in (("plain-1", "r-1"), ("plain-2", "r-2"), ("aware-3", "r-3"), ("aware-4", "r-4")):
        assert slog[label] == {"event": label, "request_id": rid}, result.stdout_lines
        assert lines[label] == {"request_id": rid}, result.stdout_lines


DASK_CHILD = """
import json
import distributed, structlog
from structlog.testing import capture_logs
import ctxprop


def ctxprop_tags(_, __, event_dict):
    return {**ctxprop.get_isolation_scope().tags, **ctxprop.get_current_scope().tags, **event_dict}


def task(label):
    # In the Dask worker process: the lines the task writes, through the README's processor.
    with capture_logs(processors=[structlog.contextvars.merge_contextvars, ctxprop_tags]) as lines:
        structlog.get_logger().info(label)
    return lines


if __name__ == "__main__":
    ctxprop.instrument()
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", silence_logs=50) as cluster, \\
            distributed.Client(cluster) as client:
        for rid in ("r-5", "r-6"):
            with ctxprop.isolation_scope():
                structlog.contextvars.bind_contextvars(bound=rid)
                ctxprop.set_tag("request_id", rid)
                print(json.dumps({"rid": rid, "lines": client.submit(task, rid, pure=False).result(60)}),
                      flush=True)
                structlog.contextvars.clear_contextvars()
"""


@pytest.mark.slow
def test_dask_task_log_lines_carry_the_scope_tags() -> None:
    """Dask Client.submit under instrument() (a LocalCluster with a worker process): the scope tags reach
    the task's structlog lines through the README's processor; structlog's contextvars stay behind."""
    pytest.importorskip("distributed")
    result = run_child(DASK_CHILD, timeout=120)
    assert result.returncode == 0, result.stderr
    got = {ln["rid"]: ln["lines"] for ln in result.json_lines if "rid" in ln}
    for rid in ("r-5", "r-6"):
        assert got[rid] == [{"event": rid, "log_level": "info", "request_id": rid}], result.stdout_lines
