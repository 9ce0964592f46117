"""The spool across real processes: concurrent replays, killed replayers, full disk, another user."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from support import REPO, OTLPReceiver, child_env, receiver, run_child  # noqa: F401
from test_spool import Collect, write_raw_segment

from ctxprop._spool import Spool

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


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def assert_each_span_once(receiver: OTLPReceiver, n: int) -> None:  # noqa: F811 - a parameter, not the fixture
    """The collector got ``n`` distinct spans (the tests name each span uniquely) and none twice."""
    counts = Counter(s.name for s in receiver.spans)
    assert len(counts) == n
    assert max(counts.values()) == 1


def run_together(code: str, n: int, timeout: float) -> list[tuple[str, str]]:
    """Start ``n`` children of ``code``; once each printed "ready", release them all at once (a line on
    stdin) and return their (stdout, stderr)."""
    children = [start_child(code) for _ in range(n)]
    try:
        for proc, _path in children:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        for proc, _path in children:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return [proc.communicate(timeout=timeout) for proc, _path in children]
    finally:
        for proc, path in children:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
            os.unlink(path)


def test_two_processes_replaying_one_spool_deliver_exactly_once(
    tmp_path: Path,
    receiver: OTLPReceiver,  # noqa: F811
) -> None:
    """Two processes started together on one spool: all 1000 spans arrive, none twice, both took part."""
    spool_dir = tmp_path / "spool"
    fill_spool(spool_dir, 100, 10)
    # 20 ms per request: one process alone would need 2 s, so both are surely replaying at the same time.
    receiver.set_mode("slow", delay=0.02)
    code = f"""
import json, sys, time
from ctxprop._spool import Spool
from ctxprop._devtools.spool_cli import make_sender
spool = Spool.open({str(spool_dir)!r})
send = make_sender({receiver.endpoint!r})
print("ready", flush=True)
sys.stdin.readline()
n = spool.replay(send, time.monotonic() + 60)
print(json.dumps({{"sent": n}}), flush=True)
"""
    outs = run_together(code, 2, timeout=90)
    sent = [json.loads(out.strip().splitlines()[-1])["sent"] for out, _err in outs]
    assert sum(sent) == 1000, outs
    assert min(sent) > 0, sent
    assert receiver.wait_for_spans(1000, 10)
    assert_each_span_once(receiver, 1000)
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
import threading, time
from ctxprop._spool import Spool
from ctxprop._devtools.spool_cli import make_sender
spool = Spool.open({str(spool_dir)!r})
real = make_sender({receiver.endpoint!r})
count = 0
def send(payload, timeout):
    global count
    count += 1
    if count == 4:
        print("holding a lease", flush=True)
        threading.Event().wait()   # blocks until killed
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
from ctxprop._devtools.spool_cli import make_sender
spool = Spool.open({str(spool_dir)!r})
print(json.dumps({{"sent": spool.replay(make_sender({receiver.endpoint!r}), time.monotonic() + 60)}}))
"""
    )
    assert result.returncode == 0, result.stderr
    assert result.last("sent") == 85
    assert receiver.wait_for_spans(100, 10)
    assert_each_span_once(receiver, 100)
    assert not any(n.startswith("seg-") for n in os.listdir(spool_dir))


def test_replayer_killed_while_giving_back_the_rest_of_a_segment_sends_nothing_twice(tmp_path: Path) -> None:
    """A send fails after two of four records, and the process dies (a fault injected in the child) just
    as the rest becomes pending again: the next replay sends the other two, and each record went once."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o700)
    records = [(f"r{i}".encode(), 1) for i in range(4)]
    write_raw_segment(spool_dir, records)
    crashed = run_child(
        f"""
import json, os, time
from ctxprop import _spool, _spool_disk
spool = _spool.Spool.open({str(spool_dir)!r})
real_rename = os.rename
def rename(src, dst, **kwargs):
    if _spool_disk.SEGMENT_RE.match(os.fspath(dst)):
        os._exit(9)   # the crash: whatever the spool did to give the rest back before this point stays
    real_rename(src, dst, **kwargs)
os.rename = rename
sent = []
def send(payload, timeout):
    if len(sent) == 2:
        return False
    sent.append(payload.decode())
    print(json.dumps({{"sent": payload.decode()}}), flush=True)
    return True
spool.replay(send, time.monotonic() + 60)
print("not reached", flush=True)
"""
    )
    assert crashed.returncode == 9, crashed.stderr
    first = [obj["sent"] for obj in crashed.json_lines]
    assert first == ["r0", "r1"]
    later = Collect()
    Spool.open(spool_dir).replay(later, float("inf"))
    assert sorted(first + [p.decode() for p in later.payloads]) == ["r0", "r1", "r2", "r3"]


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare for a pid namespace"
)
def test_lease_held_from_another_pid_namespace_is_never_taken_over(tmp_path: Path) -> None:
    """A process in its own pid namespace (a container sharing the spool volume) holds a durable lease:
    a replay here never sends it, whatever its pid means here; once that process is gone, it is recovered."""
    spool_dir = tmp_path / "spool"
    Spool.open(spool_dir).close()
    script = tmp_path / "holder.py"
    script.write_text(
        f"""
import os, sys
from ctxprop._spool import Spool
spool = Spool.open({str(spool_dir)!r})
handle = spool.write_ahead(b"in flight", 3)
print("holding", os.getpid(), handle is not None, flush=True)
sys.stdin.readline()
os._exit(0)   # gone without ack or release, as a killed process
"""
    )
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(script)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        line = proc.stdout.readline().split()
        if line[:1] != ["holding"]:
            pytest.skip(f"cannot start a process in a new pid namespace: {proc.communicate(timeout=30)}")
        assert line[1:] == ["1", "True"]
        here = Spool.open(spool_dir)
        early = Collect()
        assert here.replay(early, float("inf")) == 0
        assert early.payloads == []
        assert not here.has_pending()
        assert here.status().leased == 1
        proc.stdin.write("go\n")
        proc.stdin.flush()
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    later = Collect()
    assert Spool.open(spool_dir).replay(later, float("inf")) == 3
    assert later.payloads == [b"in flight"]


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
from ctxprop._devtools.spool_cli import make_sender
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


def test_concurrent_appenders_in_several_processes_keep_the_cap_and_count_every_drop(tmp_path: Path) -> None:
    """Three processes appending to one small spool at once: the cap holds at the end, and every span
    appended is either still there or counted once as dropped (in the shared event log)."""
    spool_dir = tmp_path / "spool"
    Spool.open(spool_dir).close()
    code = f"""
import sys
from ctxprop._spool import Spool
spool = Spool.open({str(spool_dir)!r}, max_bytes=20000)
print("ready", flush=True)
sys.stdin.readline()
for i in range(60):
    spool.append(bytes([i]) * 1000, 2)
print("done", flush=True)
"""
    outs = run_together(code, 3, timeout=60)
    assert all(out.strip() == "done" for out, _err in outs), outs
    st = Spool.open(spool_dir, max_bytes=20000).status()
    assert st.bytes <= 20000
    assert st.spans + st.dropped == 3 * 60 * 2
    assert st.segments >= 20000 // 1100  # the cap is used, not emptied by drops made twice


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


def strace_between_markers(tmp_path: Path, body: str) -> list[str]:
    """Run ``body`` in a child under strace; the system calls it made between the BEGIN and END marks."""
    trace = tmp_path / "strace.txt"
    script = tmp_path / "child.py"
    script.write_text(f"import os\n{body}")
    done = subprocess.run(
        ["strace", "-qq", "-e", "trace=write,fsync,fdatasync,openat,rename,renameat,renameat2",
         "-o", str(trace), sys.executable, str(script)],
        capture_output=True, text=True, env=child_env(), timeout=60, check=False,
    )
    if done.returncode != 0 and "ptrace" in done.stderr.lower():
        pytest.skip(f"strace cannot trace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    calls = trace.read_text().splitlines()
    begin = next(i for i, c in enumerate(calls) if 'write(1, "BEGIN' in c)
    end = next(i for i, c in enumerate(calls) if 'write(1, "END' in c)
    return calls[begin + 1 : end]


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to watch the system calls")
def test_durable_write_ahead_syncs_the_data_then_the_directory_entry(tmp_path: Path) -> None:
    """With fsync on, write_ahead() syncs the batch's data and then the spool directory (whose new entry
    would otherwise be lost by a power cut) before it returns; with fsync off it syncs neither."""
    body = f"""
from ctxprop._spool import Spool
spool = Spool.open({str(tmp_path / "spool")!r}, fsync={{sync}})
print("dirfd", spool._fd, flush=True)
os.write(1, b"BEGIN\\n")
spool.write_ahead(b"x" * 100, 1)
os.write(1, b"END\\n")
"""
    calls = strace_between_markers(tmp_path, body.format(sync=True))
    syncs = [c.split("(")[0] + "(" + c.split("(")[1].split(")")[0] + ")" for c in calls if "sync(" in c]
    (opened,) = [c for c in calls if "openat(" in c and ".tmp-" in c]
    renamed = next(i for i, c in enumerate(calls) if "rename" in c and ".lease-" in c)
    assert "fsync(" in calls[renamed + 1], calls  # the directory is synced after the entry is made
    file_fd = opened.rsplit("=", 1)[1].strip()
    dir_fd = opened.split("openat(")[1].split(",")[0]
    assert syncs == [f"fdatasync({file_fd})", f"fsync({dir_fd})"], calls
    calls = strace_between_markers(tmp_path, body.format(sync=False))
    assert not [c for c in calls if "sync(" in c], calls


# ---- end to end through init()/close() and the pipeline's processor -------------------------------------

MAKE_SPANS = """
import json, sys, time
import ctxprop
from opentelemetry import trace

def make_spans(n, tag):
    tracer = trace.get_tracer("spool-e2e")
    for i in range(n):
        with tracer.start_as_current_span(f"{tag}-{i}"):
            pass
"""


def test_collector_down_then_up_delivers_all_1000_spans_exactly_once(
    tmp_path: Path,
    receiver: OTLPReceiver,  # noqa: F811
) -> None:
    """Collector down: close() within 3 s, rc 0, silent, 1000 spans spooled (0700/0600); the next
    process's init() sends all of them in the background, exactly once."""
    spool_dir = tmp_path / "state" / "spool"
    down = run_child(
        MAKE_SPANS
        + f"""
ctxprop.init(service_name="e2e", endpoint="http://127.0.0.1:{unused_port()}/v1/traces",
             spool_dir={str(spool_dir)!r})
make_spans(1000, "down")
t0 = time.monotonic()
ctxprop.close()
print(json.dumps({{"close_s": time.monotonic() - t0, "stats": ctxprop.stats()}}))
"""
    )
    assert down.returncode == 0, down.stderr
    assert down.stderr == ""
    assert down.last("close_s") <= 3.0 + 0.5  # the deadline, plus slack for a loaded machine
    assert Spool.open(spool_dir).status().spans == 1000
    assert stat.S_IMODE(spool_dir.stat().st_mode) == 0o700
    for name in os.listdir(spool_dir):
        assert stat.S_IMODE((spool_dir / name).stat().st_mode) == 0o600
    up = run_child(
        MAKE_SPANS
        + f"""
ctxprop.init(service_name="e2e", endpoint={receiver.endpoint!r}, spool_dir={str(spool_dir)!r})
deadline = time.monotonic() + 30
while ctxprop.stats().get("spool_replayed_spans", 0) < 1000 and time.monotonic() < deadline:
    time.sleep(0.02)   # waiting for the background replay; the assertion is on the count, not the time
background = ctxprop.stats().get("spool_replayed_spans", 0)
ctxprop.close()
print(json.dumps({{"background": background}}))
"""
    )
    assert up.returncode == 0, up.stderr
    assert up.stderr == ""
    assert up.last("background") == 1000
    assert receiver.wait_for_spans(1000, 10)
    assert_each_span_once(receiver, 1000)
    assert {s.service_name for s in receiver.spans} == {"e2e"}
    assert Spool.open(spool_dir).status().segments == 0


def test_close_finishes_the_replay_within_its_deadline(
    tmp_path: Path,
    receiver: OTLPReceiver,  # noqa: F811
) -> None:
    """A process that calls close() right after init() still delivers what the spool held (and its own)."""
    spool_dir = tmp_path / "spool"
    fill_spool(spool_dir, 10, 100, tag="old")
    result = run_child(
        MAKE_SPANS
        + f"""
ctxprop.init(endpoint={receiver.endpoint!r}, spool_dir={str(spool_dir)!r})
make_spans(10, "new")
t0 = time.monotonic()
ctxprop.close()
print(json.dumps({{"close_s": time.monotonic() - t0}}))
"""
    )
    assert result.returncode == 0, result.stderr
    assert result.last("close_s") <= 3.5
    assert receiver.wait_for_spans(1010, 10)
    assert_each_span_once(receiver, 1010)


def test_spool_cap_drops_the_oldest_and_reports_the_count(
    tmp_path: Path,
    receiver: OTLPReceiver,  # noqa: F811
) -> None:
    """With a small cap and the collector down, the oldest batches are dropped and counted; the rest
    arrive later, and delivered + dropped accounts for every span."""
    spool_dir = tmp_path / "spool"
    down = run_child(
        MAKE_SPANS
        + f"""
ctxprop.init(endpoint="http://127.0.0.1:{unused_port()}/v1/traces", spool_dir={str(spool_dir)!r},
             max_export_batch_size=100)
for batch in range(10):
    make_spans(100, f"b{{batch}}")
    ctxprop.flush(0.5)
ctxprop.close()
from ctxprop._spool import Spool
print(json.dumps({{"stats": ctxprop.stats(), "dropped": Spool.open({str(spool_dir)!r}).status().dropped}}))
""",
        env={"CTXPROP_SPOOL_MAX_BYTES": "40000"},
    )
    assert down.returncode == 0, down.stderr
    dropped = down.last("stats").get("spool_dropped_spans", 0)
    assert dropped > 0
    assert down.last("dropped") == dropped
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "ctxprop", "spool", "--dir", str(spool_dir), "status", "--json"],
            capture_output=True,
            text=True,
            env=child_env(),
            check=True,
            timeout=60,
        ).stdout
    )
    assert status["dropped"] == dropped
    assert status["bytes"] <= 40000
    up = run_child(
        f"""
import ctxprop
ctxprop.init(endpoint={receiver.endpoint!r}, spool_dir={str(spool_dir)!r})
ctxprop.close()
"""
    )
    assert up.returncode == 0, up.stderr
    assert receiver.wait_for_spans(1000 - dropped, 10)
    names = Counter(s.name for s in receiver.spans)
    assert sum(names.values()) == 1000 - dropped
    assert max(names.values()) == 1
    # Oldest first: the last batch survived whole, the first one was dropped.
    assert all(f"b9-{i}" in names for i in range(100))
    assert "b0-0" not in names


DURABLE_WINDOW = 0.2  # schedule_delay: the flush window
DURABLE_SLACK = 1.0  # scheduling slack on a loaded 2-core machine


def durable_kill_run(tmp_path: Path, rx: OTLPReceiver) -> tuple[Counter[str], list[tuple[int, float]], float]:
    """A durable-mode child (collector down) ends 1000 spans, then 10 spans per tick, and is killed with
    SIGKILL at a random moment over a window after the 1000; a second process then replays the spool.
    Returns (span names delivered, (tick, end time) of each tick, kill time)."""
    import random

    spool_dir = tmp_path / "spool"
    window = DURABLE_WINDOW
    slack = DURABLE_SLACK
    extra = random.uniform(0.0, 0.3)  # noqa: S311 - a random kill moment, not a secret
    code = (
        MAKE_SPANS
        + f"""
ctxprop.init(endpoint="http://127.0.0.1:{unused_port()}/v1/traces", spool_dir={str(spool_dir)!r},
             durable=True, schedule_delay={window})
make_spans(1000, "before")
t_before = time.monotonic()
print(json.dumps({{"before_done": t_before}}), flush=True)
i = 0
while True:
    make_spans(10, f"after{{i}}")
    i += 1
    now = time.monotonic()
    late = now - t_before > {window + slack + extra}
    print(json.dumps({{"tick": i - 1, "t": now, "late": late}}), flush=True)
    time.sleep(0.01)
"""
    )
    proc, path = start_child(code)
    try:
        assert proc.stdout is not None
        ticks: list[tuple[int, float]] = []
        for line in proc.stdout:
            obj = json.loads(line)
            if "tick" in obj:
                ticks.append((obj["tick"], obj["t"]))
            if obj.get("late"):
                break
        else:
            raise AssertionError(f"child ended early: {proc.stderr.read() if proc.stderr else ''}")
        proc.kill()
        t_kill = time.monotonic()  # CLOCK_MONOTONIC: the same clock as the child's
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr, proc.stdin):
            if pipe is not None:
                pipe.close()
        os.unlink(path)
    assert proc.returncode == -signal.SIGKILL
    assert rx.requests == 0
    up = run_child(
        f"""
import ctxprop
ctxprop.init(endpoint={rx.endpoint!r}, spool_dir={str(spool_dir)!r})
ctxprop.close()
"""
    )
    assert up.returncode == 0, up.stderr
    rx.wait_for_spans(1000, 15)
    return Counter(s.name for s in rx.spans), ticks, t_kill


@pytest.fixture(scope="module")
def durable_kill(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Counter[str], list[tuple[int, float]], float]:
    """One durable_kill_run for the module: the two tests below check different spans of the same run
    (those ended before the kill's window, those ended during backoff), each on one random kill moment
    as when each made a run of its own. Read-only."""
    with OTLPReceiver() as rx:
        return durable_kill_run(tmp_path_factory.mktemp("durable-kill"), rx)


def test_durable_mode_survives_kill_9(
    durable_kill: tuple[Counter[str], list[tuple[int, float]], float],
) -> None:
    """Durable mode, collector down, kill -9 at a random moment: the spans that ended a flush window
    before the first export failed arrive with the next process, none twice."""
    names, _ticks, _t_kill = durable_kill
    assert max(names.values()) == 1
    missing = [i for i in range(1000) if f"before-{i}" not in names]
    assert missing == []


def test_durable_mode_survives_kill_9_for_spans_ended_during_backoff(
    durable_kill: tuple[Counter[str], list[tuple[int, float]], float],
) -> None:
    """Durable mode, collector down: spans ended while earlier batches are failing are also on disk one
    flush window later, so every span that ended a window before the kill arrives, none twice."""
    names, ticks, t_kill = durable_kill
    assert max(names.values()) == 1
    due = [i for i, t in ticks if t <= t_kill - DURABLE_WINDOW - DURABLE_SLACK]
    assert due
    lost = [f"after{i}-{k}" for i in due for k in range(10) if f"after{i}-{k}" not in names]
    assert lost == [], f"{len(lost)} spans lost of {len(due) * 10} ended over a window before the kill"


def test_same_process_replays_when_the_collector_comes_back(
    tmp_path: Path,
    receiver: OTLPReceiver,  # noqa: F811
) -> None:
    """Spans spooled while the collector answered 503 are sent by the same process, in the background,
    once an export succeeds again (the process then ends by os._exit: no close() does it)."""
    spool_dir = tmp_path / "spool"
    receiver.set_mode("503")
    code = (
        MAKE_SPANS
        + f"""
ctxprop.init(endpoint={receiver.endpoint!r}, spool_dir={str(spool_dir)!r}, schedule_delay=0.2)
make_spans(100, "early")
delivered = ctxprop.flush(0.5)
# Counted, not listed: the worker may be holding the segment under a lease, trying to send it.
spooled = ctxprop.stats().get("spool_written_spans", 0)
print(json.dumps({{"flushed": delivered, "spooled": spooled}}), flush=True)
sys.stdin.readline()   # the parent brings the collector back
make_spans(10, "late")
deadline = time.monotonic() + 30
while ctxprop.stats().get("spool_replayed_spans", 0) < 100 and time.monotonic() < deadline:
    time.sleep(0.02)   # waiting for the background replay; the assertion is on the count
print(json.dumps({{"replayed": ctxprop.stats().get("spool_replayed_spans", 0)}}), flush=True)
os._exit(0)
"""
    ).replace("import json, sys, time", "import json, os, sys, time")
    proc, path = start_child(code)
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        first = json.loads(proc.stdout.readline())
        assert first == {"flushed": False, "spooled": 100}
        receiver.set_mode("ok")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.unlink(path)
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == {"replayed": 100}
    assert receiver.wait_for_spans(100, 10)
    names = Counter(s.name for s in receiver.spans)
    assert all(names[f"early-{i}"] == 1 for i in range(100))


def test_spool_is_not_retried_in_a_hot_loop_while_the_collector_is_down(
    tmp_path: Path,
    receiver: OTLPReceiver,  # noqa: F811
) -> None:
    """With spans in the spool and the collector answering 503, the process backs off: a handful of
    requests per second, not hundreds (load on the machine can only lower the count)."""
    receiver.set_mode("503")
    code = (
        MAKE_SPANS
        + f"""
ctxprop.init(endpoint={receiver.endpoint!r}, spool_dir={str(tmp_path / "spool")!r})
make_spans(100, "early")
ctxprop.flush(0.5)
print("spooled", flush=True)
sys.stdin.readline()
os._exit(0)
"""
    ).replace("import json, sys, time", "import json, os, sys, time")
    proc, path = start_child(code)
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert proc.stdout.readline().strip() == "spooled"
        before = receiver.requests
        threading.Event().wait(1.0)  # an observation window, not a deadline
        during = receiver.requests - before
        proc.stdin.write("go\n")
        proc.stdin.flush()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.unlink(path)
    assert during < 30, f"{during} requests in 1 s to a collector answering 503"


def test_durable_benchmark_runs_to_its_verdict() -> None:
    """benchmarks/bench_durable.py --smoke runs to its verdict line, so the benchmark keeps working."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_durable.py"), "--smoke"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "durable (default) vs non-durable, end-to-end cost per span:" in done.stdout
