"""uvicorn in a real process against the loopback collector: SIGTERM, SIGINT and ``--workers 2``.

Each scenario runs twice, with ctxprop and with the stock OpenTelemetry SDK (the baseline): the exit
status must be the baseline's, and with ctxprop every span arrives once, each worker span (plain pool,
``asyncio.to_thread``, asgiref's ``sync_to_async``) a tagged child of its request span.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import serverkit
import support
from serverkit import (
    assert_delivered,
    drive,
    drive_every_worker,
    free_port,
    measure,
    noise,
    serve,
    telemetry_env,
)
from support import OTLPReceiver

receiver = support.receiver

VIAS = ("pool", "to_thread", "sync_to_async")
N_REQUESTS = 30
# uvicorn's supervisor kills and restarts a worker that has not answered its health check within 5 s,
# over and over on a loaded machine while the worker is still importing: give it longer.
WORKERS_2 = ("--workers", "2", "--timeout-worker-healthcheck", "30")


def _uvicorn(port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "asgi_app:app", "--host", "127.0.0.1", "--port", str(port),
        "--no-access-log", *extra,
    ]  # fmt: skip


def _run(
    receiver: OTLPReceiver, tmp_path: Path, telemetry: str, sig: int, *extra: str, workers: int = 0
) -> tuple[int, list[dict[str, Any]], str]:
    port = free_port()
    env = telemetry_env(receiver, telemetry, tmp_path)
    with serve(
        _uvicorn(port, *extra), port=port, env=env, tmp_path=tmp_path, ready_workers=workers
    ) as server:
        if workers:
            answers = drive_every_worker(server, telemetry[0], N_REQUESTS, workers)
        else:
            answers = drive(server, [f"{telemetry[0]}{i}" for i in range(N_REQUESTS)])
        server.signal(sig)
        status = server.wait(20)
        return status, answers, server.stderr()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "extra", "workers"),
    [
        pytest.param(signal.SIGTERM, (), 0, id="sigterm"),
        pytest.param(signal.SIGINT, (), 0, id="sigint"),
        pytest.param(signal.SIGTERM, WORKERS_2, 2, id="workers2-sigterm"),
        pytest.param(signal.SIGINT, WORKERS_2, 2, id="workers2-sigint"),
    ],
)
def test_uvicorn_ending_delivers_every_span_with_baseline_status(
    receiver: OTLPReceiver, tmp_path: Path, sig: int, extra: tuple[str, ...], workers: int
) -> None:
    """uvicorn stopped by a signal: every span once, parented and tagged; exit status as without ctxprop."""
    base_status, base_answers, base_err = _run(receiver, tmp_path, "stock", sig, *extra, workers=workers)
    stock_spans, base_n = receiver.span_count, len(base_answers)
    receiver.clear()
    status, answers, err = _run(receiver, tmp_path, "ctxprop", sig, *extra, workers=workers)
    spans = assert_delivered(receiver, answers, VIAS)
    measure(
        f"uvicorn {signal.Signals(sig).name} {' '.join(extra)}",
        ctxprop_spans=f"{len(spans)}/{len(answers) * 4}",
        stock_spans=f"{stock_spans}/{base_n * 4}",
        status=serverkit.signal_status(status),
        baseline_status=serverkit.signal_status(base_status),
        baseline_noise=len(noise(base_err)),
        pids=len({a["pid"] for a in answers}),
    )
    assert status == base_status, err
    assert noise(err) == [], err
    if workers:
        assert len({a["pid"] for a in answers}) == workers, "both workers served requests"
