"""A server as PID 1 of its own pid namespace (a container without an init process), stopped by SIGTERM as
``docker stop`` and Kubernetes stop it: against the loopback collector, with the stock SDK as baseline."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serverkit
import support
from serverkit import assert_delivered, drive, free_port, measure, serve, telemetry_env
from support import OTLPReceiver

receiver = support.receiver

VIAS = ("pool", "to_thread", "sync_to_async")


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return probe.stdout.strip() == "1"


def _inner_pid(server: serverkit.Server, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = server.worker_pids()
        if pids:
            return min(pids)
        time.sleep(0.05)
    pytest.fail("no process inside the namespace")


def _run(receiver: OTLPReceiver, tmp_path: Path, telemetry: str) -> tuple[int, list[dict[str, object]]]:
    port = free_port()
    argv = [
        "unshare", "--pid", "--fork", "--kill-child",
        sys.executable, "-m", "uvicorn", "asgi_app:app", "--host", "127.0.0.1", "--port", str(port),
        "--no-access-log",
    ]  # fmt: skip
    env = telemetry_env(receiver, telemetry, tmp_path)
    with serve(argv, port=port, env=env, tmp_path=tmp_path) as server:
        answers = drive(server, [f"{telemetry[0]}{i}" for i in range(20)])
        assert all(a["pid"] == 1 for a in answers)
        os.kill(_inner_pid(server, 10), signal.SIGTERM)
        return server.wait(30), answers


@pytest.mark.slow
@pytest.mark.skipif(not _can_unshare(), reason="cannot make a pid namespace here (needs unshare and root)")
def test_uvicorn_as_pid_1_stops_on_sigterm_and_delivers_every_span(
    receiver: OTLPReceiver, tmp_path: Path
) -> None:
    """uvicorn as PID 1 (no init): SIGTERM stops it as it stops without ctxprop (uvicorn handles SIGTERM
    itself), and every span arrives once, parented and tagged."""
    base_status, _ = _run(receiver, tmp_path, "stock")
    stock = receiver.span_count
    receiver.clear()
    status, answers = _run(receiver, tmp_path, "ctxprop")
    spans = assert_delivered(receiver, answers, VIAS)
    measure("uvicorn as PID 1, SIGTERM", ctxprop_spans=len(spans), stock_spans=stock,
            status=serverkit.signal_status(status), baseline_status=serverkit.signal_status(base_status))
    assert status == base_status
