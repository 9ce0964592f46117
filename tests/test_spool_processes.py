"""The spool across real processes: concurrent replays, killed replayers, full disk, another user."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from support import OTLPReceiver, child_env, receiver, run_child  # noqa: F401

# Child-side helper: real OTLP batches from the official encoder, span names "<tag>-<batch>-<i>".
MAKE_BATCHES = """
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

def make_batches(tag, n_batches, per_batch):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    out = []
    for b in range(n_batches):
        for i in range(per_batch):
            with tracer.start_as_current_span(f"{tag}-{b}-{i}"):
                pass
        out.append(encode_spans(exporter.get_finished_spans()).SerializeToString())
        exporter.clear()
    return out
"""


def fill_spool(spool_dir: Path, n_batches: int, per_batch: int, tag: str = "s") -> None:
    """Spool ``n_batches`` real OTLP batches from a separate process."""
    result = run_child(
        MAKE_BATCHES
        + f"""
import json
from ctxprop._spool import Spool
spool = Spool.open({str(spool_dir)!r})
for b in make_batches({tag!r}, {n_batches}, {per_batch}):
    spool.append(b, {per_batch})
print(json.dumps({{"status": spool.status().spans}}))
"""
    )
    assert result.returncode == 0, result.stderr
    assert result.last("status") == n_batches * per_batch


def start_child(code: str) -> tuple[subprocess.Popen[str], str]:
    fd, path = tempfile.mkstemp(suffix=".py", prefix="ctxprop_spool_child_")
    with os.fdopen(fd, "w") as f:
        f.write(textwrap.dedent(code))
    proc = subprocess.Popen(
        [sys.executable, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    return proc, path


def test_two_processes_replaying_one_spool_deliver_exactly_once(
    tmp_path: Path,
    receiver: OTLPReceiver,  # noqa: F811
) -> None:
    """Two processes started together on one spool: all 1000 spans arrive, none twice, both took part."""
    spool_dir = tmp_path / "spool"
    fill_spool(spool_dir, 100, 10)
    code = f"""
import json, sys, time
from ctxprop._spool import Spool
from ctxprop._spool_cli import make_sender
spool = Spool.open({str(spool_dir)!r})
send = make_sender({receiver.endpoint!r})
print("ready", flush=True)
sys.stdin.readline()
n = spool.replay(send, time.monotonic() + 60)
print(json.dumps({{"sent": n}}), flush=True)
"""
    children = [start_child(code) for _ in range(2)]
    try:
        for proc, _path in children:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        for proc, _path in children:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outs = [proc.communicate(timeout=90) for proc, _path in children]
    finally:
        for proc, path in children:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.unlink(path)
    sent = [json.loads(out.strip().splitlines()[-1])["sent"] for out, _err in outs]
    assert sum(sent) == 1000, outs
    assert receiver.wait_for_spans(1000, 10)
    counts = Counter(s.name for s in receiver.spans)
    assert len(counts) == 1000
    assert max(counts.values()) == 1
    assert os.listdir(spool_dir) == [] or all(not n.startswith("seg-") for n in os.listdir(spool_dir))


def test_replayer_killed_mid_send_leaves_a_lease_the_next_process_recovers(
    tmp_path: Path,
    receiver: OTLPReceiver,  # noqa: F811
) -> None:
    """kill -9 of a process holding a lease: the next replay recovers it and delivers everything once."""
    spool_dir = tmp_path / "spool"
    fill_spool(spool_dir, 20, 5)
    hung = run_child(
        f"""
import sys, time
from ctxprop._spool import Spool
from ctxprop._spool_cli import make_sender
spool = Spool.open({str(spool_dir)!r})
real = make_sender({receiver.endpoint!r})
count = 0
def send(payload, timeout):
    global count
    count += 1
    if count == 4:
        print("holding a lease", flush=True)
        sys.stdin.read()   # blocks until killed
    return real(payload, timeout)
spool.replay(send, time.monotonic() + 60)
""",
        signal_after_line="holding a lease",
        sig=signal.SIGKILL,
    )
    assert hung.signalled
    assert hung.returncode == -signal.SIGKILL
    assert receiver.wait_for_spans(15, 10)
    assert any(".lease-" in n for n in os.listdir(spool_dir))
    result = run_child(
        f"""
import json, time
from ctxprop._spool import Spool
from ctxprop._spool_cli import make_sender
spool = Spool.open({str(spool_dir)!r})
print(json.dumps({{"sent": spool.replay(make_sender({receiver.endpoint!r}), time.monotonic() + 60)}}))
"""
    )
    assert result.returncode == 0, result.stderr
    assert result.last("sent") == 85
    assert receiver.wait_for_spans(100, 10)
    counts = Counter(s.name for s in receiver.spans)
    assert len(counts) == 100
    assert max(counts.values()) == 1
    assert not any(n.startswith("seg-") for n in os.listdir(spool_dir))


def test_corrupted_byte_on_disk_loses_only_that_record_in_the_next_process(
    tmp_path: Path,
    receiver: OTLPReceiver,  # noqa: F811
) -> None:
    """One byte flipped in a segment between processes: only that record (batch) is lost, counted."""
    spool_dir = tmp_path / "spool"
    fill_spool(spool_dir, 10, 10)
    victim = sorted(n for n in os.listdir(spool_dir) if n.startswith("seg-"))[4]
    path = spool_dir / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    result = run_child(
        f"""
import json, time
import ctxprop
from ctxprop._spool import Spool
from ctxprop._spool_cli import make_sender
spool = Spool.open({str(spool_dir)!r})
sent = spool.replay(make_sender({receiver.endpoint!r}), time.monotonic() + 60)
print(json.dumps({{"sent": sent, "stats": ctxprop.stats(), "corrupt": spool.status().corrupt}}))
"""
    )
    assert result.returncode == 0, result.stderr
    assert result.last("sent") == 90
    assert result.last("stats")["spool_corrupt_records"] == 1
    assert result.last("corrupt") == 1
    assert receiver.wait_for_spans(90, 10)
    names = {s.name for s in receiver.spans}
    assert len(names) == 90
    assert not any(n.startswith("s-4-") for n in names)


def test_full_disk_degrades_to_memory_with_one_warning_and_no_exception(tmp_path: Path) -> None:
    """A write that fails (file size limit, as on a full disk) gives one warning; the app sees no error."""
    result = run_child(
        f"""
import json, resource, signal, time, warnings
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # get EFBIG from write() instead of a signal
from ctxprop._spool import Spool
spool = Spool.open({str(tmp_path / "spool")!r})
resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for i in range(5):
        spool.append(bytes([i]) * 1000, 2)
    h = spool.write_ahead(b"x" * 1000, 1)
got = []
sent = spool.replay(lambda p, t: got.append(p) or True, time.monotonic() + 10)
print(json.dumps({{"warnings": [str(w.message) for w in caught], "memory_only": spool.status().memory_only,
                   "sent": sent, "handle": h is None, "firsts": [p[0] for p in got]}}))
"""
    )
    assert result.returncode == 0, result.stderr
    assert len(result.last("warnings")) == 1
    assert "memory only" in result.last("warnings")[0]
    assert result.last("memory_only") is True
    assert result.last("sent") == 10
    assert result.last("firsts") == [0, 1, 2, 3, 4]
    assert result.last("handle") is True
    assert not any(n.startswith("seg-") for n in os.listdir(tmp_path / "spool"))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another user")
def test_process_of_another_user_cannot_use_this_users_spool() -> None:
    """A process running as another uid refuses a spool dir it does not own: memory-only, one warning."""
    # Outside pytest's private tmp tree, so the other user can reach the directory at all.
    base = Path(tempfile.mkdtemp(prefix="ctxprop-spool-perm-"))
    try:
        base.chmod(0o755)
        spool_dir = base / "spool"
        fill_spool(spool_dir, 1, 3)
        spool_dir.chmod(0o755)  # readable by others, so the refusal is about ownership, not access
        result = run_child(
            f"""
import json, os, warnings
from ctxprop._spool import Spool
os.setgid(65534); os.setuid(65534)   # after the imports: the interpreter lives under root's home
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    spool = Spool.open({str(spool_dir)!r})
    spool.append(b"x", 1)
print(json.dumps({{"warnings": [str(w.message) for w in caught], "memory_only": spool.status().memory_only}}))
"""
        )
        assert result.returncode == 0, result.stderr
        assert result.last("memory_only") is True
        assert len(result.last("warnings")) == 1
        assert "belongs to uid 0" in result.last("warnings")[0]
        assert len([n for n in os.listdir(spool_dir) if n.startswith("seg-")]) == 1
    finally:
        shutil.rmtree(base)
