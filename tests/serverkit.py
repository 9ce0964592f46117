"""Helpers for the real-server tests: start a server in its own process group, drive it with a real HTTP
client, stop it with a signal, and check what the loopback collector received.

The apps live in ``tests/apps/``. Each reads ``APP_TELEMETRY`` (``ctxprop``: ``ctxprop.init()`` as a user
would; ``stock``: the OpenTelemetry SDK's own ``BatchSpanProcessor``, the baseline without ctxprop) and
``APP_ENDPOINT`` (the collector). A ``/work?rid=...`` request makes a request span, sets the scope tag
``request_id``, and makes child spans in worker threads; it answers with the ids of its request span.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import REPO, OTLPReceiver, ReceivedSpan, child_env

APPS = Path(__file__).resolve().parent / "apps"

# Lines on a server's stderr that would mean telemetry made noise or broke something.
_NOISE = re.compile(r"ctxprop|opentelemetry|Traceback|Exception in|Error", re.IGNORECASE)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A server process started in a session (process group) of its own."""

    proc: subprocess.Popen[bytes]
    port: int
    err_path: Path
    out_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        """What the server wrote to stderr so far (stdout too: some servers log there)."""
        return self.err_path.read_text(errors="replace") + self.out_path.read_text(errors="replace")

    def signal(self, sig: int, *, group: bool = False) -> None:
        """Send ``sig`` to the server process, or to its whole process group (a terminal's Ctrl-C)."""
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """The exit status once the process ended; fails the test (after killing it) past ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"server did not exit within {timeout}s\n{self.stderr()}")

    def kill(self) -> None:
        """SIGKILL the whole process group (the server and its workers), if anything is left."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def worker_pids(self) -> set[int]:
        """The PIDs of the server's live child processes (its workers)."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return {int(p) for p in path.read_text().split()}
        except OSError:
            return set()


def telemetry_env(receiver: OTLPReceiver, telemetry: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment for an app: the collector, the telemetry mode, a spool of the test's own.

    The batch timer is set far beyond the test's length, so no span leaves early on the timer: whatever
    arrives was sent by the ending under test."""
    env = {
        "OTEL_BSP_SCHEDULE_DELAY": "60000",
        "APP_TELEMETRY": telemetry,
        "APP_ENDPOINT": receiver.endpoint,
        "CTXPROP_SPOOL_DIR": str(tmp_path / f"spool-{telemetry}"),
        "PYTHONPATH": str(APPS),
    }
    env.update(extra)
    return env


@contextlib.contextmanager
def serve(
    argv: Sequence[str],
    *,
    port: int,
    env: dict[str, str],
    tmp_path: Path,
    ready_timeout: float = 40.0,
    ready_workers: int = 0,
) -> Iterator[Server]:
    """Start ``argv`` in a new session, wait until ``GET /health`` answers (and, with ``ready_workers``,
    until that many worker PIDs answered it), yield the server; kill what is left on the way out."""
    merged = child_env(env)
    merged["PYTHONPATH"] = os.pathsep.join([str(APPS), str(REPO), merged.get("PYTHONPATH", "")])
    tag = f"{len(list(tmp_path.glob('server-*.err')))}"
    err_path = tmp_path / f"server-{tag}.err"
    out_path = tmp_path / f"server-{tag}.out"
    with err_path.open("wb") as err, out_path.open("wb") as out:
        proc = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=merged,
            cwd=str(tmp_path),
            start_new_session=True,
        )
    server = Server(proc, port, err_path, out_path)
    try:
        _wait_ready(server, ready_timeout, ready_workers)
        yield server
    finally:
        server.kill()


def _wait_ready(server: Server, timeout: float, workers: int) -> None:
    deadline = time.monotonic() + timeout
    pids: set[int] = set()
    with httpx.Client(base_url=server.base_url, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                pytest.fail(
                    f"server exited with {server.proc.returncode} before it was ready\n{server.stderr()}"
                )
            try:
                r = client.get("/health", headers={"Connection": "close"})
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            if r.status_code == 200:
                pids.add(int(r.json()["pid"]))
                if len(pids) >= max(1, workers):
                    return
            time.sleep(0.02)
    pytest.fail(f"server not ready within {timeout}s (saw pids {sorted(pids)})\n{server.stderr()}")


#: Requests sent again because the server hung up before it read them (see ``get_work``).
RESENT: list[str] = []


def get_work(client: httpx.Client, rid: str, headers: dict[str, str]) -> dict[str, Any]:
    """``GET /work?rid=RID``; sent again (twice at most) when the server closed or reset the connection
    before answering, as a worker that is leaving does with a connection it accepted but had not read yet
    (uvicorn finishes every request it has read before it leaves). Had the worker read and served the
    request, its spans would arrive twice under one rid and the test fail."""
    for attempt in range(3):
        try:
            r = client.get("/work", params={"rid": rid}, headers=headers)
        except (httpx.RemoteProtocolError, httpx.ConnectError, httpx.ReadError):
            if attempt == 2:
                raise
            RESENT.append(rid)
            continue
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        return body
    raise AssertionError("unreachable")


def drive(
    server: Server, rids: Sequence[str], *, threads: int = 4, keep_alive: bool = True
) -> list[dict[str, Any]]:
    """Send ``GET /work?rid=R`` for each rid from ``threads`` client threads; return the JSON answers.

    ``keep_alive=False`` opens a connection per request (for servers that recycle their workers: a
    keep-alive connection to a worker that is leaving would fail a request with no server at fault)."""
    headers = {} if keep_alive else {"Connection": "close"}
    answers: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    todo = list(rids)

    def loop() -> None:
        with httpx.Client(base_url=server.base_url, timeout=10.0) as client:
            while True:
                with lock:
                    if not todo or errors:
                        return
                    rid = todo.pop()
                try:
                    body = get_work(client, rid, headers)
                except BaseException as e:  # noqa: BLE001 - reported by the test thread below
                    with lock:
                        errors.append(e)
                    return
                with lock:
                    answers[rid] = body

    pool = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(30)
    assert not errors, f"request failed: {errors[0]!r}\n{server.stderr()}"
    assert len(answers) == len(rids), server.stderr()
    return [answers[r] for r in rids]


class Load:
    """Requests sent back to back from a client thread until ``stop()``: traffic while a server reloads.

    Each request on a connection of its own, as through a load balancer that does not pool: a keep-alive
    connection to a worker that is leaving could fail a request with no server at fault."""

    def __init__(self, server: Server, prefix: str) -> None:
        self._server = server
        self._prefix = prefix
        self._stop = threading.Event()
        self.answers: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self._progress = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        i = 0
        with httpx.Client(base_url=self._server.base_url, timeout=10.0) as client:
            while not self._stop.is_set():
                rid = f"{self._prefix}{i}"
                i += 1
                try:
                    body = get_work(client, rid, {"Connection": "close"})
                except httpx.HTTPError as e:
                    self.failures.append(f"{rid}: {e!r}")
                    continue
                with self._progress:
                    self.answers.append(body)
                    self._progress.notify_all()

    def wait_for(self, n: int, timeout: float) -> bool:
        """Block until ``n`` requests were answered in all, or ``timeout`` passed."""
        with self._progress:
            return self._progress.wait_for(lambda: len(self.answers) >= n, timeout)

    def wait_for_pids(self, n: int, timeout: float) -> bool:
        """Block until answers came from ``n`` distinct worker processes, or ``timeout`` passed."""
        with self._progress:
            return self._progress.wait_for(lambda: len({a["pid"] for a in self.answers}) >= n, timeout)

    def stop(self) -> None:
        """Stop after the request in flight; wait for the client thread."""
        self._stop.set()
        self._thread.join(30)


def drive_every_worker(server: Server, prefix: str, n: int, workers: int) -> list[dict[str, Any]]:
    """Send requests (as ``Load`` does) until at least ``n`` were answered and each of ``workers`` worker
    processes answered some: the kernel may hand every connection to the same worker."""
    with Load(server, prefix) as load:
        assert load.wait_for_pids(workers, 30), server.stderr()
        assert load.wait_for(n, 30), server.stderr()
    assert load.failures == [], load.failures[:3]
    return load.answers


def assert_delivered(
    receiver: OTLPReceiver,
    answers: Sequence[dict[str, Any]],
    workers: Sequence[str],
    *,
    others: int = 0,
    timeout: float = 10.0,
) -> list[ReceivedSpan]:
    """Each answered request's trace arrived, each span exactly once: its request span (the answer's
    ``span_id``), one child of it per name in ``workers`` (``work RID NAME``) and ``others`` more spans (a
    framework's own); every span of the trace carries the request's ``request_id`` tag."""
    per_request = 1 + len(workers) + others
    expected = len(answers) * per_request
    receiver.wait_for_spans(expected, timeout)
    spans = receiver.spans
    counts = Counter((s.trace_id, s.span_id) for s in spans)
    dupes = [k for k, v in counts.items() if v > 1]
    assert not dupes, f"{len(dupes)} spans arrived more than once, e.g. {dupes[:3]}"
    by_trace: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        by_trace.setdefault(s.trace_id, []).append(s)
    missing: list[str] = []
    for a in answers:
        rid, trace_id = a["rid"], a["trace_id"]
        trace = by_trace.get(trace_id, [])
        if len(trace) != per_request:
            missing.append(f"{rid}: {len(trace)}/{per_request} spans")
            continue
        untagged = [s.name for s in trace if s.attributes.get("request_id") != rid]
        assert not untagged, f"{rid}: spans without request_id={rid}: {untagged}"
        assert any(s.span_id == a["span_id"] for s in trace), f"{rid}: no request span"
        kids = sorted(s.name for s in trace if s.parent_span_id == a["span_id"])
        assert kids == sorted(f"work {rid} {w}" for w in workers), f"{rid}: request span children {kids}"
    assert not missing, f"{len(missing)}/{len(answers)} requests' traces incomplete, e.g. {missing[:3]}"
    assert len(spans) == expected, f"{len(spans)} spans arrived, {expected} expected"
    return spans


def noise(text: str) -> list[str]:
    """The lines of a server's output that mention ctxprop, OpenTelemetry, a traceback or an error."""
    return [ln for ln in text.splitlines() if _NOISE.search(ln)]


def signal_status(status: int) -> str:
    """A readable exit status: ``-15 (SIGTERM)`` or ``0``."""
    if status < 0:
        return f"{status} ({signal.Signals(-status).name})"
    return str(status)


def measure(label: str, **values: object | None) -> None:
    """Record a measurement for the run's log (``pytest -rA`` or ``-s`` shows it)."""
    print(f"[measure] {label}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
