"""``python -m ctxprop spool status|replay|purge`` run as a real command."""

from __future__ import annotations

import gzip
import json
import os
import pty
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from support import OTLPReceiver, child_env, receiver  # noqa: F401
from test_spool import otlp_batches

from ctxprop._spool import Spool


def spool_cmd(
    *args: str, env: dict[str, str] | None = None, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *flags, "-m", "ctxprop", "spool", *args],
        capture_output=True,
        text=True,
        env=child_env(env),
        timeout=60,
        check=False,
    )


def fill(d: Path, n_batches: int, per_batch: int) -> None:
    spool = Spool.open(d)
    for b in otlp_batches(n_batches, per_batch):
        spool.append(b, per_batch)
    spool.close()


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_status_reports_segments_spans_bytes_and_age(tmp_path: Path) -> None:
    """status prints segments, spans, bytes, oldest age and drops; --json gives the same as one object."""
    fill(tmp_path, 3, 7)
    human = spool_cmd("--dir", str(tmp_path), "status")
    assert human.returncode == 0, human.stderr
    assert "segments:  3" in human.stdout
    assert "spans:     21" in human.stdout
    assert "dropped:   0" in human.stdout
    machine = spool_cmd("--dir", str(tmp_path), "status", "--json")
    st = json.loads(machine.stdout)
    assert (st["segments"], st["spans"], st["dropped"], st["corrupt"]) == (3, 21, 0, 0)
    assert st["bytes"] == sum(p.stat().st_size for p in tmp_path.iterdir())
    assert st["oldest_age"] >= 0
    assert machine.stderr == ""


def test_status_of_a_missing_spool_creates_nothing(tmp_path: Path) -> None:
    """status of a directory that does not exist reports an empty spool and does not create it."""
    missing = tmp_path / "never"
    out = spool_cmd("--dir", str(missing), "status", "--json")
    assert out.returncode == 0
    assert json.loads(out.stdout)["segments"] == 0
    assert not missing.exists()


def test_default_directory_follows_service_and_state_home(tmp_path: Path) -> None:
    """Without --dir, the spool of --service under $XDG_STATE_HOME is used, as init() would."""
    fill(tmp_path / "ctxprop" / "billing", 1, 4)
    env = {"XDG_STATE_HOME": str(tmp_path), "CTXPROP_SPOOL_DIR": ""}
    out = spool_cmd("--service", "billing", "status", "--json", env=env)
    assert json.loads(out.stdout)["spans"] == 4


def test_replay_sends_everything_to_the_endpoint(tmp_path: Path, receiver: OTLPReceiver) -> None:  # noqa: F811
    """replay --endpoint delivers every spooled span once, empties the spool and exits 0."""
    fill(tmp_path, 10, 10)
    out = spool_cmd("--dir", str(tmp_path), "replay", "--endpoint", receiver.endpoint)
    assert out.returncode == 0, out.stderr
    assert "sent 100 spans" in out.stdout
    assert out.stderr == ""
    assert receiver.wait_for_spans(100, 10)
    assert set(Counter(s.name for s in receiver.spans).values()) == {1}
    assert Spool.open(tmp_path).status().segments == 0


def test_replay_resolves_the_endpoint_from_the_environment(
    tmp_path: Path,
    receiver: OTLPReceiver,  # noqa: F811
) -> None:
    """Without --endpoint, OTEL_EXPORTER_OTLP_ENDPOINT + /v1/traces is used, as init() does."""
    fill(tmp_path, 2, 5)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.base_url, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}
    out = spool_cmd("--dir", str(tmp_path), "replay", env=env)
    assert out.returncode == 0, out.stderr
    assert receiver.wait_for_spans(10, 10)


def test_replay_with_the_collector_down_keeps_the_spool(tmp_path: Path) -> None:
    """replay against a closed port exits 1 and keeps every segment."""
    fill(tmp_path, 3, 2)
    out = spool_cmd(
        "--dir", str(tmp_path), "replay", "--endpoint", f"http://127.0.0.1:{unused_port()}/v1/traces"
    )
    assert out.returncode == 1
    assert "6 spans in 3 segments remain" in out.stdout
    assert Spool.open(tmp_path).status().spans == 6


def test_purge_empties_the_spool(tmp_path: Path) -> None:
    """purge deletes what waits and says how many spans it removed."""
    fill(tmp_path, 4, 3)
    out = spool_cmd("--dir", str(tmp_path), "purge")
    assert out.returncode == 0
    assert "purged 12 spans" in out.stdout
    assert Spool.open(tmp_path).status().segments == 0


def test_unusable_directory_exits_2_with_the_warning(tmp_path: Path) -> None:
    """A symlinked spool dir is refused: exit status 2 and the reason on stderr."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    out = spool_cmd("--dir", str(tmp_path / "link"), "status")
    assert out.returncode == 2
    assert "symbolic link" in out.stderr


def run_with_tty_stderr(args: list[str]) -> tuple[int, str]:
    """Run the command with stderr on a pseudo-terminal; returns (status, what the terminal showed)."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctxprop", "spool", *args],
        stdout=subprocess.DEVNULL,
        stderr=secondary,
        env=child_env(),
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO once the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    return proc.wait(60), b"".join(chunks).decode(errors="replace")


def test_progress_bar_only_on_a_terminal_for_a_large_spool(
    tmp_path: Path,
    receiver: OTLPReceiver,  # noqa: F811
) -> None:
    """A large replay draws a progress bar on a terminal stderr; a small one, or a pipe, draws none."""
    big, small = tmp_path / "big", tmp_path / "small"
    fill(big, 25, 2)
    fill(small, 2, 2)
    status, shown = run_with_tty_stderr(["--dir", str(big), "replay", "--endpoint", receiver.endpoint])
    assert status == 0
    assert "replaying [" in shown
    assert "50/50 spans" in shown
    status, shown = run_with_tty_stderr(["--dir", str(small), "replay", "--endpoint", receiver.endpoint])
    assert status == 0
    assert "replaying" not in shown
    fill(big, 25, 2)
    piped = spool_cmd("--dir", str(big), "replay", "--endpoint", receiver.endpoint)
    assert piped.returncode == 0
    assert piped.stderr == ""


def test_unusable_directory_reason_is_said_once_even_with_warnings_as_errors(tmp_path: Path) -> None:
    """The reason a spool dir is refused is the command's own message: said once, and still said when
    Python runs with -W error (which turns the library's warning into a swallowed exception)."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for flags in ((), ("-W", "error")):
        out = spool_cmd("--dir", str(tmp_path / "link"), "replay", flags=flags)
        assert out.returncode == 2
        assert out.stderr.count("symbolic link") == 1, out.stderr
        assert out.stderr.startswith(f"cannot use the spool at {tmp_path / 'link'}: "), out.stderr


class Recorder(BaseHTTPRequestHandler):
    """Answers every POST with the server's ``answer`` status and records (headers, body)."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        server: RecordingServer = self.server  # type: ignore[assignment]
        server.seen.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(server.answer)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class RecordingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, answer: int) -> None:
        super().__init__(("127.0.0.1", 0), Recorder)
        self.answer = answer
        self.seen: list[tuple[dict[str, str], bytes]] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"


@pytest.fixture
def recorder_factory() -> Iterator[type[RecordingServer]]:
    servers: list[RecordingServer] = []

    class Started(RecordingServer):
        def __init__(self, answer: int) -> None:
            super().__init__(answer)
            servers.append(self)
            threading.Thread(target=self.serve_forever, daemon=True).start()

    yield Started
    for server in servers:
        server.shutdown()
        server.server_close()


def test_replay_uses_the_otlp_headers_and_compression_of_the_environment(
    tmp_path: Path, recorder_factory: type[RecordingServer]
) -> None:
    """replay sends as init() would: OTEL_EXPORTER_OTLP_HEADERS and _COMPRESSION apply to each request."""
    fill(tmp_path, 2, 3)
    spooled = sorted(otlp_batches(2, 3))
    server = recorder_factory(200)
    env = {"OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=blue", "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"}
    out = spool_cmd("--dir", str(tmp_path), "replay", "--endpoint", server.endpoint, env=env)
    assert out.returncode == 0, out.stderr
    assert len(server.seen) == 2
    for headers, _body in server.seen:
        assert headers["x-tenant"] == "blue"
        assert headers["content-encoding"] == "gzip"
    assert len(spooled) == len({gzip.decompress(body) for _h, body in server.seen})


def test_replay_with_bad_otlp_settings_exits_2_and_keeps_the_spool(tmp_path: Path) -> None:
    """A malformed OTEL_EXPORTER_OTLP_HEADERS stops replay with status 2 and a message, as init() would."""
    fill(tmp_path, 1, 2)
    out = spool_cmd("--dir", str(tmp_path), "replay", env={"OTEL_EXPORTER_OTLP_HEADERS": "no pairs here"})
    assert out.returncode == 2
    assert "cannot replay: OTEL_EXPORTER_OTLP_HEADERS" in out.stderr, out.stderr
    assert Spool.open(tmp_path).status().spans == 2
    bad_timeout = spool_cmd("--dir", str(tmp_path), "replay", "--timeout", "0")
    assert bad_timeout.returncode == 2
    assert "positive number of seconds" in bad_timeout.stderr


def test_replay_refused_for_good_says_so_and_exits_1(
    tmp_path: Path, recorder_factory: type[RecordingServer]
) -> None:
    """A collector answering 400 refuses the spans for good: they are dropped (not kept to block the
    spool), the command says how many, exits 1, and status reports them as rejected."""
    fill(tmp_path, 3, 4)
    server = recorder_factory(400)
    out = spool_cmd("--dir", str(tmp_path), "replay", "--endpoint", server.endpoint)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "sent 0 spans" in out.stdout
    assert "12 spans refused for good by the collector" in out.stdout
    st = json.loads(spool_cmd("--dir", str(tmp_path), "status", "--json").stdout)
    assert (st["segments"], st["rejected"]) == (0, 12)
    assert "rejected:  12 spans" in spool_cmd("--dir", str(tmp_path), "status").stdout


def test_without_a_service_name_status_and_replay_cover_every_services_spool(
    tmp_path: Path, receiver: OTLPReceiver  # noqa: F811
) -> None:
    """With no --dir, --service, OTEL_SERVICE_NAME or CTXPROP_SPOOL_DIR, status lists and replay sends every
    service's spool under the state directory; purge refuses to guess which one."""
    fill(tmp_path / "ctxprop" / "billing", 2, 3)
    fill(tmp_path / "ctxprop" / "search", 1, 5)
    env = {"XDG_STATE_HOME": str(tmp_path), "CTXPROP_SPOOL_DIR": "", "OTEL_SERVICE_NAME": ""}
    status = spool_cmd("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    seen = {Path(st["directory"]).name: st["spans"] for st in map(json.loads, status.stdout.splitlines())}
    assert seen == {"billing": 6, "search": 5}
    purge = spool_cmd("purge", env=env)
    assert purge.returncode == 2
    assert "billing, search" in purge.stderr
    replay = spool_cmd("replay", "--endpoint", receiver.endpoint, env=env)
    assert replay.returncode == 0, replay.stderr
    assert receiver.wait_for_spans(11, 10)
    assert len(receiver.spans) == 11


def test_status_is_read_only_whatever_the_spool_holds(tmp_path: Path) -> None:
    """status never deletes, renames or repairs anything: not with a huge (sparse) newest segment over
    the size cap, a dead process's lease, an old temp file, a planted symlink or a widened mode."""
    d = tmp_path / "spool"
    fill(d, 5, 100)
    huge = d / f"seg-{time.time_ns() + 10**12:020d}-1-deadbeef-1.ctxs"
    with open(huge, "wb") as f:
        f.truncate(2**30)  # 1 GiB, sparse: far over the 64 MiB cap
    real = sorted(p.name for p in d.iterdir() if p.name.startswith("seg-"))
    lease = d / f"{real[0]}.lease-999999"
    os.rename(d / real[0], lease)  # nobody holds its lock: housekeeping would put it back
    tmp_file = d / ".tmp-999999-0badf00d"
    tmp_file.write_bytes(b"x")
    os.utime(tmp_file, (0, 0))  # long past the grace period: housekeeping would remove it
    (d / f"seg-{1:020d}-1-feedf00d-3.ctxs").symlink_to("/etc/passwd")
    d.chmod(0o755)
    before = {p.name: (p.lstat().st_size, p.lstat().st_mode) for p in d.iterdir()}
    out = spool_cmd("--dir", str(d), "status", "--json")
    assert out.returncode == 0, out.stderr
    assert {p.name: (p.lstat().st_size, p.lstat().st_mode) for p in d.iterdir()} == before
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    assert json.loads(out.stdout)["spans"] >= 401


def test_replay_shows_neither_header_values_nor_endpoint_credentials(
    tmp_path: Path,
    receiver: OTLPReceiver,  # noqa: F811
) -> None:
    """replay prints the endpoint with its user:password@ as ***@, and a malformed header variable's
    error without its value; the secret is on neither stdout nor stderr."""
    secret = "s3cr3t-T0KEN"  # noqa: S105 - a fake token that must never be shown
    fill(tmp_path, 1, 2)
    url = receiver.endpoint.replace("http://", f"http://user:{secret}@")
    sent = spool_cmd("--dir", str(tmp_path), "replay", "--endpoint", url)
    assert sent.returncode == 0, sent.stderr
    assert "***@127.0.0.1" in sent.stdout
    assert secret not in sent.stdout + sent.stderr
    fill(tmp_path, 1, 2)
    bad = spool_cmd(
        "--dir", str(tmp_path), "replay", env={"OTEL_EXPORTER_OTLP_HEADERS": f"Authorization Bearer {secret}"}
    )
    assert bad.returncode == 2
    assert "OTEL_EXPORTER_OTLP_HEADERS" in bad.stderr
    assert secret not in bad.stdout + bad.stderr
