"""The spool in one process: format, corruption, bounds, permissions, leases, durable write-ahead."""

from __future__ import annotations

import contextlib
import gc
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import Future
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import OTLPReceiver, child_env, receiver  # noqa: F401

from ctxprop import _spool_disk, _spool_format, _stats
from ctxprop._devtools.receiver import decode_request
from ctxprop._devtools.spool_cli import make_sender
from ctxprop._spool import Spool, default_spool_dir

FAR = float("inf")


def otlp_batches(n_batches: int, per_batch: int, prefix: str = "s") -> list[bytes]:
    """Real OTLP request bytes from the official encoder, span names ``{prefix}{batch}-{i}``."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    out = []
    for b in range(n_batches):
        for i in range(per_batch):
            with tracer.start_as_current_span(f"{prefix}{b}-{i}"):
                pass
        out.append(encode_spans(exporter.get_finished_spans()).SerializeToString())
        exporter.clear()
    provider.shutdown()
    return out


def names_in(payloads: list[bytes]) -> list[str]:
    return [s.name for p in payloads for s in decode_request(p)]


class Collect:
    """A ``send`` that records what it was given and can be told to fail."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.payloads: list[bytes] = []
        self.fail_after = fail_after
        self.lock = threading.Lock()

    def __call__(self, payload: bytes, timeout: float) -> bool:
        with self.lock:
            if self.fail_after is not None and len(self.payloads) >= self.fail_after:
                return False
            self.payloads.append(payload)
            return True


def files(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def segments(d: Path) -> list[str]:
    return [n for n in files(d) if n.startswith("seg-") and n.endswith(".ctxs")]


def write_raw_segment(d: Path, records: list[tuple[bytes, int]], created_ns: int | None = None) -> Path:
    """A multi-record segment written byte by byte in the documented format."""
    created = time.time_ns() if created_ns is None else created_ns
    data = _spool_format.FILE_MAGIC + b"".join(_spool_format.encode_record(p, n, created) for p, n in records)
    spans = sum(n for _p, n in records)
    path = d / f"seg-{created:020d}-{os.getpid()}-0badcafe-{spans}.ctxs"
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def test_append_then_replay_sends_the_same_otlp_bytes_once(tmp_path: Path) -> None:
    """Spooled OTLP requests come back byte for byte, oldest first, and the spool is empty afterwards."""
    batches = otlp_batches(3, 5)
    spool = Spool.open(tmp_path / "spool")
    for b in batches:
        spool.append(b, 5)
    assert spool.has_pending()
    sent = Collect()
    assert spool.replay(sent, FAR) == 15
    assert sent.payloads == batches
    assert not spool.has_pending()
    assert segments(tmp_path / "spool") == []
    assert spool.replay(sent, FAR) == 0
    assert _stats.snapshot()["spool_replayed_spans"] == 15


def test_segment_format_is_magic_then_checksummed_records(tmp_path: Path) -> None:
    """A segment is the file magic then header+payload records, each with a CRC-32 over both."""
    spool = Spool.open(tmp_path)
    spool.append(b"payload-bytes", 7)
    (name,) = segments(tmp_path)
    assert name.endswith("-7.ctxs")
    data = (tmp_path / name).read_bytes()
    assert data.startswith(_spool_format.FILE_MAGIC)
    records, corrupt = _spool_format.parse_records(data)
    assert corrupt == 0
    assert [(p, n) for p, n, _c in records] == [(b"payload-bytes", 7)]
    assert data.endswith(b"payload-bytes")


def test_spool_replays_to_a_real_collector(tmp_path: Path, receiver: OTLPReceiver) -> None:  # noqa: F811
    """Replay through the OTLP/HTTP sender delivers every spooled span to a loopback collector."""
    spool = Spool.open(tmp_path)
    for b in otlp_batches(4, 25):
        spool.append(b, 25)
    assert spool.replay(make_sender(receiver.endpoint), time.monotonic() + 30) == 100
    assert receiver.wait_for_spans(100, 10)
    names = Counter(s.name for s in receiver.spans)
    assert len(names) == 100
    assert set(names.values()) == {1}


def test_collector_down_keeps_the_segment_pending(tmp_path: Path, receiver: OTLPReceiver) -> None:  # noqa: F811
    """A refused or failing send leaves the segment pending, unchanged, for the next replay."""
    spool = Spool.open(tmp_path)
    spool.append(otlp_batches(1, 3)[0], 3)
    before = segments(tmp_path)
    receiver.set_mode("503")
    assert spool.replay(make_sender(receiver.endpoint), time.monotonic() + 10) == 0
    assert segments(tmp_path) == before
    receiver.set_mode("ok")
    assert spool.replay(make_sender(receiver.endpoint), time.monotonic() + 10) == 3
    assert segments(tmp_path) == []


def test_partial_failure_never_resends_acknowledged_records(tmp_path: Path) -> None:
    """When a send fails mid-segment, the acknowledged records are gone and only the rest stays pending."""
    recs = [(f"r{i}".encode(), i + 1) for i in range(4)]
    write_raw_segment(tmp_path, recs)
    spool = Spool.open(tmp_path)
    first = Collect(fail_after=2)
    assert spool.replay(first, FAR) == 1 + 2
    (rest,) = segments(tmp_path)
    assert rest.endswith("-7.ctxs")
    second = Collect()
    assert spool.replay(second, FAR) == 3 + 4
    assert first.payloads + second.payloads == [p for p, _n in recs]


def test_replay_stops_at_the_deadline(tmp_path: Path) -> None:
    """A deadline already passed sends nothing and keeps everything."""
    spool = Spool.open(tmp_path)
    spool.append(b"x", 1)
    sent = Collect()
    assert spool.replay(sent, time.monotonic() - 1) == 0
    assert sent.payloads == []
    assert len(segments(tmp_path)) == 1


def test_a_raising_sender_is_a_failed_send(tmp_path: Path) -> None:
    """A send that raises is treated as not acknowledged; replay returns normally."""
    spool = Spool.open(tmp_path)
    spool.append(b"x", 1)

    def boom(payload: bytes, timeout: float) -> bool:
        raise ConnectionError("down")

    assert spool.replay(boom, FAR) == 0
    assert len(segments(tmp_path)) == 1


def test_corrupt_byte_in_the_middle_loses_only_that_record(tmp_path: Path) -> None:
    """A flipped payload byte in the middle record: it is skipped and counted, the others are sent."""
    batches = otlp_batches(3, 4)
    path = write_raw_segment(tmp_path, [(b, 4) for b in batches])
    data = bytearray(path.read_bytes())
    middle = data.index(batches[1]) + len(batches[1]) // 2
    data[middle] ^= 0xFF
    path.write_bytes(bytes(data))
    spool = Spool.open(tmp_path)
    sent = Collect()
    assert spool.replay(sent, FAR) == 8
    assert sent.payloads == [batches[0], batches[2]]
    assert _stats.snapshot()["spool_corrupt_records"] == 1
    assert spool.status().corrupt == 1
    assert segments(tmp_path) == []


def test_corrupt_length_field_resynchronises_on_the_next_record(tmp_path: Path) -> None:
    """A damaged record header (length) does not hide the records after it."""
    path = write_raw_segment(tmp_path, [(b"a" * 50, 1), (b"b" * 50, 1), (b"c" * 50, 1)])
    data = bytearray(path.read_bytes())
    second = len(_spool_format.FILE_MAGIC) + _spool_format.REC_HEAD.size + 50
    data[second + 4] ^= 0x7F  # the u32 length of the second record
    path.write_bytes(bytes(data))
    sent = Collect()
    assert Spool.open(tmp_path).replay(sent, FAR) == 2
    assert sent.payloads == [b"a" * 50, b"c" * 50]
    assert _stats.snapshot()["spool_corrupt_records"] == 1


def test_truncated_segment_sends_the_complete_records(tmp_path: Path) -> None:
    """A segment cut short (crash mid-write) keeps its complete records; the torn tail is counted."""
    path = write_raw_segment(tmp_path, [(b"a" * 40, 2), (b"b" * 40, 3)])
    path.write_bytes(path.read_bytes()[:-10])
    sent = Collect()
    assert Spool.open(tmp_path).replay(sent, FAR) == 2
    assert sent.payloads == [b"a" * 40]
    assert _stats.snapshot()["spool_corrupt_records"] == 1


def test_size_cap_drops_the_oldest_segments_and_counts_them(tmp_path: Path) -> None:
    """Over the size cap, the oldest segments go first; drops show in stats() and in status()."""
    spool = Spool.open(tmp_path, max_bytes=5000)
    for i in range(10):
        spool.append(bytes([i]) * 1000, 10)
    st = spool.status()
    assert st.bytes <= 5000
    kept = st.segments
    assert 1 <= kept < 10
    assert _stats.snapshot()["spool_dropped_spans"] == (10 - kept) * 10
    assert _stats.snapshot()["spool_dropped_segments"] == 10 - kept
    assert st.dropped == (10 - kept) * 10
    sent = Collect()
    spool.replay(sent, FAR)
    assert [p[0] for p in sent.payloads] == list(range(10 - kept, 10))


def test_a_segment_gone_since_the_listing_does_not_cost_a_newer_one(tmp_path: Path) -> None:
    """Caps are enforced on a listing that may be stale (concurrent processes): a segment another process
    dropped or leased since then frees its bytes too, so no newer segment is dropped in its place."""
    spool = Spool.open(tmp_path)
    for i in range(4):
        spool.append(bytes([i]) * 1000, 1)
    listing = sorted(spool._entries())
    oldest = listing[0][0]
    os.rename(tmp_path / oldest, tmp_path / f"{oldest}.lease-{os.getpid()}")
    spool.max_bytes = sum(e[3] for e in listing) - 1  # over the cap by less than one segment
    spool._drop_over_caps(listing)
    assert len(segments(tmp_path)) == 3
    assert _stats.snapshot().get("spool_dropped_segments", 0) == 0


def test_age_cap_drops_expired_segments_when_opened(tmp_path: Path) -> None:
    """Segments older than the age cap are dropped (and counted) when the spool is opened."""
    write_raw_segment(tmp_path, [(b"old", 4)], created_ns=time.time_ns() - 3600 * 10**9)
    write_raw_segment(tmp_path, [(b"new", 2)])
    spool = Spool.open(tmp_path, max_age=60)
    assert _stats.snapshot()["spool_dropped_spans"] == 4
    sent = Collect()
    assert spool.replay(sent, FAR) == 2
    assert sent.payloads == [b"new"]


def test_status_reports_segments_spans_bytes_and_age(tmp_path: Path) -> None:
    """status() counts segments, spans and bytes from the listing and gives the oldest segment's age."""
    spool = Spool.open(tmp_path)
    assert spool.status().segments == 0
    assert spool.status().oldest_age is None
    write_raw_segment(tmp_path, [(b"x" * 10, 3)], created_ns=time.time_ns() - 50 * 10**9)
    spool.append(b"y" * 20, 4)
    st = spool.status()
    assert (st.segments, st.spans) == (2, 7)
    assert st.bytes == sum((tmp_path / n).stat().st_size for n in segments(tmp_path))
    assert st.oldest_age is not None
    assert 49 < st.oldest_age < 3600
    assert not st.memory_only


def test_directory_is_created_0700_and_files_0600(tmp_path: Path) -> None:
    """A new spool directory is 0700 (parents included) and every segment file is 0600."""
    d = tmp_path / "a" / "b" / "spool"
    spool = Spool.open(d)
    spool.append(b"x", 1)
    spool.write_ahead(b"y", 1)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE(d.parent.stat().st_mode) == 0o700
    for name in files(d):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name


def test_wide_mode_of_an_own_directory_is_repaired(tmp_path: Path) -> None:
    """A spool directory of this user left 0777 is brought back to 0700."""
    d = tmp_path / "spool"
    d.mkdir()
    d.chmod(0o777)
    Spool.open(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_symlinked_directory_is_refused_with_one_warning(tmp_path: Path) -> None:
    """A symlink in place of the spool dir is never followed: memory-only spool and one RuntimeWarning."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "spool"
    link.symlink_to(target)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spool = Spool.open(link)
        spool.append(b"a", 1)
        spool.append(b"b", 1)
    assert [w.category for w in caught] == [RuntimeWarning]
    assert "symbolic link" in str(caught[0].message)
    assert os.listdir(target) == []
    st = spool.status()
    assert st.memory_only
    assert (st.segments, st.spans) == (2, 2)
    sent = Collect()
    assert spool.replay(sent, FAR) == 2
    assert sent.payloads == [b"a", b"b"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a directory owned by another user")
def test_another_users_directory_is_refused(tmp_path: Path) -> None:
    """A directory pre-created by another user is refused (memory-only, one warning), never written to."""
    d = tmp_path / "spool"
    d.mkdir(mode=0o777)
    os.chown(d, 65534, 65534)
    with pytest.warns(RuntimeWarning, match="belongs to uid 65534"):
        spool = Spool.open(d)
    spool.append(b"x", 1)
    assert os.listdir(d) == []
    assert spool.status().memory_only


def test_planted_symlink_segment_is_never_followed(tmp_path: Path) -> None:
    """A symlink named like a segment is not read through nor sent, and its target is untouched."""
    secret = tmp_path / "secret"
    secret.write_bytes(_spool_format.FILE_MAGIC + _spool_format.encode_record(b"secret", 1, time.time_ns()))
    d = tmp_path / "spool"
    spool = Spool.open(d)
    (d / f"seg-{time.time_ns():020d}-1-deadbeef-1.ctxs").symlink_to(secret)
    sent = Collect()
    assert spool.replay(sent, FAR) == 0
    assert sent.payloads == []
    assert secret.exists()


def test_a_fifo_in_the_spool_never_blocks_replay_status_or_the_drop_log(tmp_path: Path) -> None:
    """A FIFO under a segment's or the event log's name (no writer, no reader) is skipped: replay, status
    and noting a drop return at once instead of waiting forever in open()."""
    spool = Spool.open(tmp_path)
    os.mkfifo(tmp_path / f"seg-{time.time_ns():020d}-1-deadbeef-1.ctxs", 0o600)
    os.mkfifo(tmp_path / "events", 0o600)
    spool.append(b"real", 1)
    done: Future[tuple[int, int, int]] = Future()

    def work() -> None:
        try:
            sent = spool.replay(Collect(), FAR)
            corrupt = spool.status().corrupt
            spool.max_bytes = 0
            spool.append(b"dropped at once", 1)  # the drop is noted in the (FIFO) event log
            done.set_result((sent, corrupt, _stats.snapshot()["spool_dropped_spans"]))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            done.set_exception(exc)

    threading.Thread(target=work, daemon=True).start()
    try:
        assert done.result(timeout=30) == (1, 0, 1)
    finally:
        if not done.done():  # unblock the stuck thread: a writer, then a reader, for each FIFO
            for fifo in (*tmp_path.glob("seg-*"), tmp_path / "events"):
                with contextlib.suppress(OSError):
                    os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))


def test_write_ahead_is_invisible_to_replay_until_released(tmp_path: Path) -> None:
    """A batch written ahead is leased by its writer: replay skips it; release() makes it pending."""
    spool = Spool.open(tmp_path)
    handle = spool.write_ahead(b"batch", 9)
    assert handle is not None
    assert not spool.has_pending()
    sent = Collect()
    assert spool.replay(sent, FAR) == 0
    assert spool.status().leased == 1
    spool.release(handle)
    assert spool.has_pending()
    assert spool.replay(sent, FAR) == 9
    assert sent.payloads == [b"batch"]


def test_ack_removes_the_write_ahead_record(tmp_path: Path) -> None:
    """ack() after a delivered export leaves nothing behind."""
    spool = Spool.open(tmp_path)
    spool.ack(spool.write_ahead(b"batch", 9))
    assert files(tmp_path) == []
    spool.ack(None)
    spool.release(None)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


HOLDER = """
import os, sys
from ctxprop._spool import Spool
spool = Spool.open(sys.argv[1])
spool.write_ahead(b"held", 5)
print("holding", flush=True)
sys.stdin.readline()
os._exit(0)   # gone without ack or release, as a killed process
"""


def test_lease_of_a_live_process_is_left_alone_and_recovered_once_it_is_gone(tmp_path: Path) -> None:
    """A lease another running process holds is neither sent nor pending; when that process dies
    without settling it, the next replay sends it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert proc.stdout.readline().strip() == "holding"
        spool = Spool.open(tmp_path)
        assert not spool.has_pending()
        assert spool.replay(Collect(), FAR) == 0
        assert spool.status().leased == 1
        proc.communicate("go\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    spool = Spool.open(tmp_path)
    assert spool.has_pending()
    sent = Collect()
    assert spool.replay(sent, FAR) == 5
    assert sent.payloads == [b"held"]


def test_a_lease_is_judged_by_its_lock_not_by_the_pid_in_its_name(tmp_path: Path) -> None:
    """A lease nobody holds locked is recovered even when its name shows a live pid (this one: a pid
    reused, or one seen from another pid namespace); a lease this process holds stays leased."""
    spool = Spool.open(tmp_path)
    held = spool.write_ahead(b"mine", 2)
    assert isinstance(held, _spool_disk.Handle)
    write_raw_segment(tmp_path, [(b"orphan", 3)])
    (orphan,) = segments(tmp_path)
    os.rename(tmp_path / orphan, tmp_path / f"{orphan}.lease-{os.getpid()}")
    assert spool.has_pending()
    sent = Collect()
    assert spool.replay(sent, FAR) == 3
    assert sent.payloads == [b"orphan"]
    assert spool.status().leased == 1
    spool.ack(held)
    assert files(tmp_path) == []


def test_write_ahead_holds_a_bounded_number_of_descriptors(tmp_path: Path) -> None:
    """Batches written ahead and not yet settled hold one descriptor each, up to a bound; past it a
    batch is not written ahead (counted), and settling one makes room again."""
    spool = Spool.open(tmp_path)
    fds_before = len(os.listdir("/proc/self/fd"))
    handles = [spool.write_ahead(b"x", 1) for _ in range(_spool_disk.MAX_HELD)]
    assert None not in handles
    assert spool.write_ahead(b"one too many", 3) is None
    assert _stats.snapshot()["spool_write_ahead_skipped_spans"] == 3
    assert len(os.listdir("/proc/self/fd")) - fds_before == _spool_disk.MAX_HELD
    spool.release(handles[0])
    assert spool.write_ahead(b"room again", 1) is not None
    assert spool.status().leased == _spool_disk.MAX_HELD


def open_fds_on(path: Path) -> int:
    """How many of this process's descriptors refer to ``path`` or a file in it."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(path))
    return count


def test_a_spool_dropped_without_close_releases_its_descriptors(tmp_path: Path) -> None:
    """A spool that is garbage-collected unclosed (an init() after a close()) closes its directory
    descriptor and lease locks, so its unsettled batches are recovered; close() does the same at once."""
    spool = Spool.open(tmp_path)
    spool.write_ahead(b"unsettled", 4)
    assert open_fds_on(tmp_path) == 2
    del spool
    gc.collect()
    assert open_fds_on(tmp_path) == 0
    closed = Spool.open(tmp_path)
    closed.close()
    closed.close()
    assert open_fds_on(tmp_path) == 0
    sent = Collect()
    assert Spool.open(tmp_path).replay(sent, FAR) == 4
    assert sent.payloads == [b"unsettled"]


def test_a_child_forked_during_a_replay_does_not_keep_the_segment_locked(tmp_path: Path) -> None:
    """fork() while a replay holds a segment's lock (e.g. a fork-started pool): once the parent gives the
    segment back, the next replay can take and send it although the child still runs."""
    spool = Spool.open(tmp_path)
    spool.append(b"segment", 2)
    release_r, release_w = os.pipe()
    children: list[int] = []

    def fork_then_fail(payload: bytes, timeout: float) -> bool:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child waits for the parent's word, then leaves
            os.close(release_w)
            os.read(release_r, 1)
            os._exit(0)
        children.append(pid)
        return False

    try:
        assert spool.replay(fork_then_fail, FAR) == 0
        sent = Collect()
        assert spool.replay(sent, FAR) == 2
        assert sent.payloads == [b"segment"]
    finally:
        os.close(release_w)
        os.close(release_r)
        for pid in children:
            os.waitpid(pid, 0)


def test_settling_a_handle_twice_or_after_fork_does_nothing(tmp_path: Path) -> None:
    """ack/release of a handle already settled, or inherited through fork(), touch nothing: no other
    batch's lease is removed or unlocked."""
    spool = Spool.open(tmp_path)
    first = spool.write_ahead(b"first", 1)
    spool.ack(first)
    second = spool.write_ahead(b"second", 1)  # may reuse the first one's descriptor number
    spool.ack(first)
    spool.release(first)
    assert spool.status().leased == 1
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe and leaves at once
        spool.ack(second)
        spool.release(second)
        os.write(write_end, b"done")
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as r:
        assert r.read() == b"done"
    os.waitpid(pid, 0)
    assert spool.status().leased == 1
    assert not spool.has_pending()
    spool.release(second)
    sent = Collect()
    assert spool.replay(sent, FAR) == 1
    assert sent.payloads == [b"second"]


def test_concurrent_replays_in_threads_send_each_segment_once(tmp_path: Path) -> None:
    """Eight threads replaying one spool at once deliver every segment exactly once."""
    spool = Spool.open(tmp_path)
    for i in range(200):
        spool.append(i.to_bytes(2, "big"), 1)
    sent = Collect()
    barrier = threading.Barrier(8)
    totals: list[int] = []

    def go() -> None:
        barrier.wait()
        totals.append(spool.replay(sent, FAR))

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(totals) == 200
    assert sorted(sent.payloads) == [i.to_bytes(2, "big") for i in range(200)]


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    """An incomplete temp segment nobody holds, past the grace period, is cleaned up, never sent; a
    fresh one (its writer may be about to lock it) is left alone."""
    stale = tmp_path / f".tmp-{dead_pid()}-0000abcd"
    stale.write_bytes(b"half a segment")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    fresh = tmp_path / f".tmp-{dead_pid()}-0000abce"
    fresh.write_bytes(b"being written")
    spool = Spool.open(tmp_path)
    assert files(tmp_path) == [fresh.name]
    assert spool.replay(Collect(), FAR) == 0


def test_purge_removes_pending_and_the_event_log(tmp_path: Path) -> None:
    """purge() deletes pending segments, memory records and the drop log, and says how many spans went."""
    spool = Spool.open(tmp_path, max_bytes=1500)
    for _ in range(3):
        spool.append(b"z" * 1000, 4)
    assert spool.status().dropped > 0
    assert spool.purge() == 4
    st = spool.status()
    assert (st.segments, st.dropped) == (0, 0)
    assert files(tmp_path) == []


def test_event_log_is_compacted_to_totals_instead_of_growing_or_freezing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past its size limit the drop/corrupt log is rewritten as totals: it stays small, and status()
    keeps counting every drop."""
    monkeypatch.setattr(_spool_disk, "_EVENTS_MAX", 200)
    spool = Spool.open(tmp_path, max_bytes=0)
    for _ in range(100):
        spool.append(b"dropped at once", 3)
    assert spool.status().dropped == 300
    assert (tmp_path / "events").stat().st_size < 400
    assert stat.S_IMODE((tmp_path / "events").stat().st_mode) == 0o600


def test_memory_only_spool_is_bounded(tmp_path: Path) -> None:
    """A memory-only spool keeps at most max_bytes and counts what it drops."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(RuntimeWarning, match="memory only"):
        spool = Spool.open(blocker / "spool", max_bytes=2500)
    for i in range(5):
        spool.append(bytes([i]) * 1000, 3)
    st = spool.status()
    assert st.memory_only
    assert st.segments == 2
    assert _stats.snapshot()["spool_dropped_spans"] == 9
    assert spool.write_ahead(b"x", 1) is None


def test_warning_is_an_exception_under_error_filter_but_never_reaches_the_caller(tmp_path: Path) -> None:
    """With warnings turned into errors (as here), opening an unusable spool still returns a spool."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    spool = Spool.open(blocker / "spool")
    spool.append(b"x", 1)
    assert spool.status().memory_only


def test_default_dir_honours_env_and_sanitises_the_service(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """CTXPROP_SPOOL_DIR wins, else $XDG_STATE_HOME/ctxprop/<service>, else ~/.local/state; sanitised."""
    monkeypatch.setenv("CTXPROP_SPOOL_DIR", str(tmp_path / "explicit"))
    assert default_spool_dir("svc") == tmp_path / "explicit"
    monkeypatch.delenv("CTXPROP_SPOOL_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert default_spool_dir("billing/api ../x") == tmp_path / "state" / "ctxprop" / "billing_api_.._x"
    assert default_spool_dir("..") == tmp_path / "state" / "ctxprop" / "unknown_service"
    assert default_spool_dir(None).name == "unknown_service"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_spool_dir("svc") == tmp_path / "home" / ".local" / "state" / "ctxprop" / "svc"


def test_replay_reports_progress_per_record(tmp_path: Path) -> None:
    """The progress callback gets the span count of each acknowledged record."""
    spool = Spool.open(tmp_path)
    spool.append(b"a", 3)
    spool.append(b"b", 4)
    seen: list[int] = []
    spool.replay(Collect(), FAR, progress=seen.append)
    assert seen == [3, 4]


def test_names_helper_decodes_spooled_batches() -> None:
    """The test helper's batches are real OTLP requests (guards the helpers the other tests rely on)."""
    assert names_in(otlp_batches(1, 2, prefix="p")) == ["p0-0", "p0-1"]


class Outcome:
    """Shaped like the pipeline's SendOutcome: ``ok`` and ``permanent``."""

    def __init__(self, ok: bool, permanent: bool = False) -> None:
        self.ok = ok
        self.permanent = permanent


def test_outcome_senders_are_understood(tmp_path: Path) -> None:
    """A sender answering outcome objects: ok delivers, retryable keeps, permanent drops that record only."""
    spool = Spool.open(tmp_path)
    for name in (b"keep", b"bad", b"good"):
        spool.append(name, 2)
    answers = {b"keep": [Outcome(False), Outcome(True)], b"bad": [Outcome(False, permanent=True)]}
    seen: list[bytes] = []

    def send(payload: bytes, timeout: float) -> Outcome:
        seen.append(payload)
        queue = answers.get(payload)
        return queue.pop(0) if queue else Outcome(True)

    assert spool.replay(send, FAR) == 0
    assert seen == [b"keep"]
    assert spool.replay(send, FAR) == 4
    assert seen == [b"keep", b"keep", b"bad", b"good"]
    assert _stats.snapshot()["spool_rejected_spans"] == 2
    assert not spool.has_pending()


def test_caps_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """CTXPROP_SPOOL_MAX_BYTES / CTXPROP_SPOOL_MAX_AGE set the caps; a bad value warns and is ignored."""
    monkeypatch.setenv("CTXPROP_SPOOL_MAX_BYTES", "4096")
    monkeypatch.setenv("CTXPROP_SPOOL_MAX_AGE", "60")
    spool = Spool.open(tmp_path)
    assert (spool.max_bytes, spool.max_age) == (4096, 60.0)
    monkeypatch.setenv("CTXPROP_SPOOL_MAX_BYTES", "lots")
    with pytest.warns(RuntimeWarning, match="CTXPROP_SPOOL_MAX_BYTES"):
        spool = Spool.open(tmp_path)
    assert spool.max_bytes == 64 * 2**20


def test_fsync_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Write-ahead syncs by default; CTXPROP_SPOOL_FSYNC=0 or fsync=False turns it off, records still land."""
    assert Spool.open(tmp_path).fsync is True
    monkeypatch.setenv("CTXPROP_SPOOL_FSYNC", "0")
    spool = Spool.open(tmp_path)
    assert spool.fsync is False
    assert Spool.open(tmp_path, fsync=True).fsync is True
    spool.release(spool.write_ahead(b"unsynced", 2))
    sent = Collect()
    assert spool.replay(sent, FAR) == 2
    assert sent.payloads == [b"unsynced"]


def test_forked_child_does_not_inherit_memory_records(tmp_path: Path) -> None:
    """After fork(), the child's memory-only spool is empty: only the parent sends what it held."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.warns(RuntimeWarning):
        spool = Spool.open(blocker / "spool")
    spool.append(b"parent's", 5)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe and leaves at once
        os.write(write_end, str(spool.status().spans).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as r:
        child_spans = r.read().decode()
    os.waitpid(pid, 0)
    assert child_spans == "0"
    assert spool.status().spans == 5


@pytest.mark.parametrize("kind", ["disk", "memory"])
def test_a_spool_locked_by_another_thread_at_fork_works_in_the_child(tmp_path: Path, kind: str) -> None:
    """fork() while another thread holds a spool's lock (disk or memory: one registry resets both kinds):
    the child can still store a batch in it and read its status; it does not wait forever for that thread."""
    if kind == "disk":
        spool = Spool.open(tmp_path / "spool")
    else:
        (tmp_path / "file").write_text("x")
        with pytest.warns(RuntimeWarning):
            spool = Spool.open(tmp_path / "file" / "spool")
    assert spool.memory_only is (kind == "memory")
    held, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with spool._lock:  # type: ignore[attr-defined]  # the lock a parent's thread may hold at fork
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    read_end, write_end = os.pipe()
    try:
        assert held.wait(30)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe and leaves at once
            try:
                # The pipeline's durable path: both steps take the lock (a memory spool's append does).
                handle = spool.write_ahead(b"child's", 1)
                if handle is None:
                    spool.append(b"child's", 1)
                else:
                    spool.release(handle)
                os.write(write_end, str(spool.status().spans).encode())
            finally:
                os._exit(0)
    finally:
        release.set()
        holder.join(30)
    os.close(write_end)
    answered, _, _ = select.select([read_end], [], [], 10)
    if not answered:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as r:
        child_spans = r.read().decode() if answered else "no answer (deadlocked)"
    assert child_spans == "1"
    spool.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a directory owned by another user")
def test_parent_pre_created_by_another_user_is_refused(tmp_path: Path) -> None:
    """A spool under a directory another user owns (who could swap it) is refused: memory-only."""
    parent = tmp_path / "ctxprop"
    parent.mkdir(mode=0o755)
    os.chown(parent, 65534, 65534)
    with pytest.warns(RuntimeWarning, match="belongs to uid 65534"):
        spool = Spool.open(parent / "svc")
    assert spool.status().memory_only


def test_world_writable_parent_without_sticky_bit_is_refused(tmp_path: Path) -> None:
    """A spool under a world-writable, non-sticky directory is refused; a sticky one (like /tmp) is fine."""
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    open_parent.chmod(0o777)
    with pytest.warns(RuntimeWarning, match="writable by every user"):
        assert Spool.open(open_parent / "svc").status().memory_only
    assert os.listdir(open_parent) == []
    open_parent.chmod(0o1777)
    assert not Spool.open(open_parent / "svc2").status().memory_only


def test_missing_parents_of_the_default_spool_dir_are_private_under_umask_000(tmp_path: Path) -> None:
    """Under umask 000, init() creates the default spool directory and each missing parent 0700."""
    from support import run_child

    state = tmp_path / "state" / "deeper"
    result = run_child(
        """
import os, ctxprop
os.umask(0)
ctxprop.init(service_name="svc", endpoint="http://127.0.0.1:9/v1/traces")
ctxprop.close(0.5)
""",
        env={"XDG_STATE_HOME": str(state), "CTXPROP_SPOOL_DIR": ""},
    )
    assert result.returncode == 0, result.stderr
    made = [tmp_path / "state", state, state / "ctxprop", state / "ctxprop" / "svc"]
    modes = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in made}
    assert modes == dict.fromkeys(map(str, made), "0o700")
