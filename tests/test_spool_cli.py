"""``python -m ctxprop spool status|replay|purge`` run as a real command."""

from __future__ import annotations

import json
import os
import pty
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

from support import OTLPReceiver, child_env, receiver  # noqa: F401
from test_spool import otlp_batches

from ctxprop._spool import Spool


def spool_cmd(*args: str, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctxprop", "spool", *args],
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
