"""gunicorn with uvicorn's ``UvicornWorker`` in real processes against the loopback collector: ``--preload``,
a HUP reload under load, ``--max-requests`` recycling, and Ctrl-C to the process group.

Each scenario runs twice, with ctxprop and with the stock OpenTelemetry SDK (the baseline): the master's
exit status must be the baseline's, and with ctxprop every span of every answered request arrives once,
each worker span a tagged child of its request span, whichever worker process served it.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import support
from serverkit import (
    APPS,
    Load,
    Server,
    assert_delivered,
    drive,
    drive_every_worker,
    free_port,
    measure,
    noise,
    serve,
    signal_status,
    telemetry_env,
)
from support import OTLPReceiver

receiver = support.receiver

VIAS = ("pool", "to_thread", "sync_to_async")
#: "delivered/expected" of the last baseline run, for the measurement line.
STOCK_DELIVERED: list[str] = []


def _gunicorn(port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "gunicorn", "asgi_app:app", "-k", "uvicorn_worker.UvicornWorker",
        "-w", "2", "-b", f"127.0.0.1:{port}", "--graceful-timeout", "10", "--no-control-socket", *extra,
    ]  # fmt: skip


def _start(receiver: OTLPReceiver, tmp_path: Path, telemetry: str, *extra: str, **env_extra: str) -> Any:
    port = free_port()
    env = telemetry_env(receiver, telemetry, tmp_path, **env_extra)
    return serve(_gunicorn(port, *extra), port=port, env=env, tmp_path=tmp_path, ready_workers=2)


def _wait_workers_replaced(server: Server, old: set[int], timeout: float) -> set[int]:
    """Poll (with a deadline) until none of ``old`` is a worker any more and two new ones are."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = server.worker_pids()
        if len(now) == 2 and not now & old:
            return now
        time.sleep(0.05)
    pytest.fail(f"workers {sorted(old)} not replaced within {timeout}s\n{server.stderr()}")


def _count(receiver: OTLPReceiver, telemetry: str, answers: list[dict[str, Any]]) -> None:
    if telemetry == "stock":
        STOCK_DELIVERED.append(f"{receiver.span_count}/{len(answers) * 4}")


def _compare(
    label: str, receiver: OTLPReceiver, answers: list[dict[str, Any]], runs: dict[str, tuple[int, str]]
) -> None:
    spans = assert_delivered(receiver, answers, VIAS)
    status, err = runs["ctxprop"]
    base_status, base_err = runs["stock"]
    measure(
        label,
        ctxprop_spans=f"{len(spans)}/{len(answers) * 4}",
        stock_spans=STOCK_DELIVERED.pop(),
        status=signal_status(status),
        baseline_status=signal_status(base_status),
        baseline_noise=len(noise(base_err)),
        worker_pids=len({a["pid"] for a in answers}),
    )
    assert status == base_status, err
    assert noise(err) == [], err


@pytest.mark.slow
@pytest.mark.parametrize("where", ["master", "post_fork"])
def test_gunicorn_preload_delivers_every_worker_span(
    receiver: OTLPReceiver, tmp_path: Path, where: str
) -> None:
    """--preload, init() in the master at import or in each worker by a post_fork hook; two forked workers;
    SIGTERM to the master: every span once, parented and tagged, the master's exit status as without
    ctxprop."""
    sig = signal.SIGTERM
    runs: dict[str, tuple[int, str]] = {}
    answers: list[dict[str, Any]] = []
    extra = ("-c", str(APPS / "gunicorn_conf.py")) if where == "post_fork" else ()
    for telemetry in ("stock", "ctxprop"):
        receiver.clear()
        with _start(receiver, tmp_path, telemetry, "--preload", *extra, APP_INIT=where) as server:
            answers = drive_every_worker(server, telemetry[0], 40, 2)
            server.signal(sig)
            runs[telemetry] = (server.wait(30), server.stderr())
            _count(receiver, telemetry, answers)
    _compare(f"gunicorn --preload init in {where}, {signal.Signals(sig).name}", receiver, answers, runs)
    assert len({a["pid"] for a in answers}) == 2, "both workers served requests"


@pytest.mark.slow
def test_gunicorn_hup_reload_under_load_delivers_every_span(receiver: OTLPReceiver, tmp_path: Path) -> None:
    """HUP while a client keeps sending: the old workers leave gracefully, the new ones serve; every span of
    every answered request (old workers' and new ones') arrives once, parented and tagged."""
    runs: dict[str, tuple[int, str]] = {}
    answers: list[dict[str, Any]] = []
    failures: dict[str, int] = {}
    for telemetry in ("stock", "ctxprop"):
        receiver.clear()
        with _start(receiver, tmp_path, telemetry) as server, Load(server, f"{telemetry[0]}") as load:
            assert load.wait_for(10, 20), server.stderr()
            old = server.worker_pids()
            server.signal(signal.SIGHUP)
            _wait_workers_replaced(server, old, 30)
            assert load.wait_for(len(load.answers) + 10, 20), server.stderr()
            load.stop()
            server.signal(signal.SIGTERM)
            runs[telemetry] = (server.wait(30), server.stderr())
            answers, failures[telemetry] = load.answers, len(load.failures)
            _count(receiver, telemetry, answers)
            assert load.failures == [], load.failures[:3]
        pids = {a["pid"] for a in answers}
        assert len(pids & old) >= 1, "old workers served requests"
        assert len(pids - old) >= 1, "new workers served requests"
    _compare("gunicorn HUP under load", receiver, answers, runs)
    measure("gunicorn HUP under load", requests=len(answers), failed_requests=failures)


@pytest.mark.slow
def test_gunicorn_max_requests_recycling_delivers_every_span(receiver: OTLPReceiver, tmp_path: Path) -> None:
    """--max-requests: workers leave after a few requests and new ones are forked; the leavers' spans
    arrive once, parented and tagged."""
    runs: dict[str, tuple[int, str]] = {}
    answers: list[dict[str, Any]] = []
    for telemetry in ("stock", "ctxprop"):
        receiver.clear()
        with (
            _start(receiver, tmp_path, telemetry, "--max-requests", "8") as server,
            Load(server, telemetry[0]) as load,
        ):
            # uvicorn checks the limit once a second: four pids mean each first worker left and was replaced.
            assert load.wait_for_pids(4, 30), server.stderr()
            load.stop()
            server.signal(signal.SIGTERM)
            runs[telemetry] = (server.wait(30), server.stderr())
            answers = load.answers
            _count(receiver, telemetry, answers)
            assert load.failures == [], load.failures[:3]
    _compare("gunicorn --max-requests 8", receiver, answers, runs)


@pytest.mark.slow
@pytest.mark.parametrize("preload", [False, True], ids=["import-in-worker", "preload"])
def test_gunicorn_ctrl_c_to_process_group_delivers_every_span(
    receiver: OTLPReceiver, tmp_path: Path, preload: bool
) -> None:
    """Ctrl-C in a terminal (SIGINT to the whole process group: master and workers at once; UvicornWorker
    re-raises SIGINT with its default action): every span once, exit status as without ctxprop."""
    runs: dict[str, tuple[int, str]] = {}
    answers: list[dict[str, Any]] = []
    extra = ("--preload",) if preload else ()
    for telemetry in ("stock", "ctxprop"):
        receiver.clear()
        with _start(receiver, tmp_path, telemetry, *extra) as server:
            answers = drive_every_worker(server, telemetry[0], 40, 2)
            server.signal(signal.SIGINT, group=True)
            runs[telemetry] = (server.wait(30), server.stderr())
            _count(receiver, telemetry, answers)
    _compare(f"gunicorn Ctrl-C to the group {'--preload' if preload else ''}", receiver, answers, runs)


@pytest.mark.slow
@pytest.mark.skipif(sys.version_info < (3, 12), reason="the multi-threaded fork() warning exists from 3.12")
def test_gunicorn_preload_master_forks_without_multithreaded_warning(
    receiver: OTLPReceiver, tmp_path: Path
) -> None:
    """--preload: init() in the master leaves no thread running there, so neither the first workers' fork
    nor a HUP's (after requests were served) warns "multi-threaded, use of fork() may lead to deadlocks"."""
    port = free_port()
    env = telemetry_env(receiver, "ctxprop", tmp_path, PYTHONWARNINGS="always::DeprecationWarning")
    with serve(
        _gunicorn(port, "--preload"), port=port, env=env, tmp_path=tmp_path, ready_workers=2
    ) as server:
        answers = drive(server, [f"a{i}" for i in range(10)], keep_alive=False)
        old = server.worker_pids()
        server.signal(signal.SIGHUP)
        _wait_workers_replaced(server, old, 30)
        answers += drive(server, [f"b{i}" for i in range(10)], keep_alive=False)
        server.signal(signal.SIGTERM)
        status = server.wait(30)
        err = server.stderr()
    warned = [ln for ln in err.splitlines() if "multi-threaded" in ln]
    measure("gunicorn --preload fork warnings", warnings=len(warned), status=status)
    assert warned == [], err
    assert status == 0, err
    assert_delivered(receiver, answers, VIAS)
