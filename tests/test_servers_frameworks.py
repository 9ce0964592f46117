"""Flask under gunicorn's gthread workers and FastAPI sync endpoints under uvicorn, in real processes
against the loopback collector.

Each scenario runs twice, with ctxprop and with the stock OpenTelemetry SDK (the baseline): the exit
status must be the baseline's, and with ctxprop every span arrives once, each worker span a tagged child of
its request span.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import support
from serverkit import (
    assert_delivered,
    drive,
    free_port,
    measure,
    noise,
    serve,
    signal_status,
    telemetry_env,
)
from support import OTLPReceiver

receiver = support.receiver


def _both(
    receiver: OTLPReceiver,
    tmp_path: Path,
    argv: list[str],
    port: int,
    sig: int,
    *,
    workers: int = 0,
    n: int = 30,
) -> tuple[list[dict[str, Any]], dict[str, tuple[int, str, int]]]:
    """Run the server once with the stock SDK, then with ctxprop (its spans stay in ``receiver``)."""
    runs: dict[str, tuple[int, str, int]] = {}
    answers: list[dict[str, Any]] = []
    for telemetry in ("stock", "ctxprop"):
        receiver.clear()
        env = telemetry_env(receiver, telemetry, tmp_path)
        with serve(argv, port=port, env=env, tmp_path=tmp_path, ready_workers=workers) as server:
            answers = drive(server, [f"{telemetry[0]}{i}" for i in range(n)], keep_alive=False)
            server.signal(sig)
            status = server.wait(30)
            runs[telemetry] = (status, server.stderr(), receiver.span_count)
    return answers, runs


def _check(
    label: str, receiver: OTLPReceiver, answers: list[dict[str, Any]], runs: Any, vias: Any, others: int = 0
) -> None:
    spans = assert_delivered(receiver, answers, vias, others=others)
    (status, err, _), (base_status, base_err, stock_spans) = runs["ctxprop"], runs["stock"]
    expected = len(answers) * (1 + len(vias) + others)
    measure(
        label,
        ctxprop_spans=f"{len(spans)}/{expected}",
        stock_spans=f"{stock_spans}/{expected}",
        status=signal_status(status),
        baseline_status=signal_status(base_status),
        baseline_noise=len(noise(base_err)),
    )
    assert status == base_status, err
    assert noise(err) == [], err


@pytest.mark.slow
def test_flask_gthread_instrumented_pool_spans_parented_and_tagged(
    receiver: OTLPReceiver, tmp_path: Path
) -> None:
    """Flask under gunicorn -k gthread, instrument() and a plain ThreadPoolExecutor and Thread in the view:
    every worker span a tagged child of its request span, every span once, the status as without ctxprop."""
    port = free_port()
    argv = [
        sys.executable, "-m", "gunicorn", "flask_app:app", "-k", "gthread", "--threads", "4", "-w", "2",
        "-b", f"127.0.0.1:{port}", "--no-control-socket", "--graceful-timeout", "10",
    ]  # fmt: skip
    # SIGTERM, not Ctrl-C: on Ctrl-C to the group, gunicorn 27's gthread worker can deadlock with or
    # without ctxprop (the SIGQUIT the master sends re-enters the SIGINT handler's executor shutdown), and
    # the master SIGKILLs it after --graceful-timeout.
    answers, runs = _both(receiver, tmp_path, argv, port, signal.SIGTERM, workers=2)
    _check("flask gthread SIGTERM", receiver, answers, runs, ("pool-a", "pool-b", "thread"))


@pytest.mark.slow
def test_fastapi_sync_endpoint_spans_under_the_request_span(receiver: OTLPReceiver, tmp_path: Path) -> None:
    """FastAPI sync endpoint (anyio's thread pool) under uvicorn, FastAPI's own spans and a tagging
    middleware: the endpoint's work, and a plain pool's inside it, are tagged children of the endpoint's
    span in the request's trace; every span once, the status as without ctxprop."""
    port = free_port()
    argv = [
        sys.executable, "-m", "uvicorn", "fastapi_app:app", "--host", "127.0.0.1", "--port", str(port),
        "--no-access-log",
    ]  # fmt: skip
    answers, runs = _both(receiver, tmp_path, argv, port, signal.SIGTERM)
    # Per request, besides the endpoint span and its two children: FastAPI's server span and its
    # dependencies and serialization spans.
    _check("fastapi sync endpoint SIGTERM", receiver, answers, runs, ("endpoint", "pool"), others=3)
