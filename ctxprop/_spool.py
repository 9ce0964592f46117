"""The offline spool: OTLP requests that could not be sent yet wait on disk and are sent exactly once later.

Layout of a spool directory (0700, owned by the user, opened once with ``O_NOFOLLOW`` and then only used
through its file descriptor, so a path swapped later cannot redirect a write):

- ``seg-<created_ns>-<pid>-<rand>-<spans>.ctxs``: a complete pending segment (files are 0600). The name
  carries the creation time and the span count, so ordering, age and ``status()`` need a listing only.
- ``<segment>.lease-<pid>``: a segment some process is sending right now (or, in durable mode, a batch
  written ahead of its export). Its owner holds an exclusive ``flock()`` on it from before the name
  exists until it is done, and a lease is taken by one atomic ``rename()`` of a segment already locked:
  of two processes only one wins, so no segment is sent twice. A lease nobody holds locked (its owner
  died: the kernel drops the lock with the process, in any pid namespace) goes back to pending.
- ``.tmp-<pid>-<rand>``: a segment being written (locked by its writer); renamed to its final name only
  when complete.
- ``events``: an append-only log of drops and corrupt records, so ``status()`` reports them across processes.

A segment is ``_FILE_MAGIC`` then records: ``b"CTXR"``, u32 payload length, u32 span count, u64 creation
time (ns), u32 CRC-32 of those three fields and the payload, then the payload (an OTLP
``ExportTraceServiceRequest``). A damaged record is skipped and counted; the reader looks for the next
record magic whose checksum holds, so the rest of the segment is still sent.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import struct
import tempfile
import threading
import time
import warnings
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ctxprop import _stats

try:
    import fcntl
except ImportError:  # not POSIX: the spool is memory-only there
    fcntl = None  # type: ignore[assignment]

__all__ = ["Spool", "SpoolStatus", "default_spool_dir"]

_FILE_MAGIC = b"CTXSPL1\n"
_REC_MAGIC = b"CTXR"
_REC_HEAD = struct.Struct("<4sIIQI")
_REC_FIELDS = struct.Struct("<IIQ")

_SEGMENT_RE = re.compile(r"^seg-(\d{20})-(\d+)-([0-9a-f]{8})-(\d+)\.ctxs$")
_LEASE_RE = re.compile(r"^(seg-(\d{20})-\d+-[0-9a-f]{8}-(\d+)\.ctxs)\.lease-[0-9a-f-]+$")
_TMP_RE = re.compile(r"^\.tmp-(\d+)-[0-9a-f]{8}$")
_EVENTS = "events"
_DEFAULT_MAX_BYTES = 64 * 2**20
_DEFAULT_MAX_AGE = 7 * 86400.0
_EVENTS_MAX = 1 << 20
# A writer creates its temp file, then locks it: an unlocked one younger than this may be in between.
_TMP_GRACE = 60.0
# Each write-ahead batch in flight holds a descriptor (its lease's lock). Tiny batches piling up behind a
# collector that says "retry later" must not take the application's descriptors: past this many, a
# batch is exported without a write-ahead copy (counted), and spooled as usual if its export fails.
_MAX_HELD = 128

# getattr: these flags are POSIX-only; elsewhere the spool opens memory-only instead of failing to import.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
# Opening a FIFO planted under a spool name would otherwise wait forever for its other end.
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW


def _sanitize(service_name: str | None) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", service_name or "").lstrip(".")[:64]
    return name or "unknown_service"


def default_spool_dir(service_name: str | None) -> Path:
    """The spool directory used when ``init()`` gets no ``spool_dir``.

    ``CTXPROP_SPOOL_DIR`` if set (used as is), else ``$XDG_STATE_HOME/ctxprop/<service>``, else
    ``~/.local/state/ctxprop/<service>``; the service name is reduced to ``[A-Za-z0-9._-]``.

    >>> default_spool_dir("billing api").name
    'billing_api'

    .. versionadded:: 0.1.0
    """
    configured = os.environ.get("CTXPROP_SPOOL_DIR")
    if configured:
        return Path(configured).expanduser()
    state = os.environ.get("XDG_STATE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    if state and os.path.isabs(state):
        base = Path(state)
    else:
        try:
            base = Path.home() / ".local" / "state"
        except (RuntimeError, KeyError):
            base = Path(tempfile.gettempdir()) / f"ctxprop-{os.getuid()}"
    return base / "ctxprop" / _sanitize(service_name)


@dataclass(frozen=True)
class SpoolStatus:
    """What a spool holds: ``Spool.status()`` and ``python -m ctxprop spool status``.

    ``segments``, ``spans`` and ``bytes`` wait to be sent; ``leased`` segments are being sent by running
    processes. ``dropped`` spans (size or age cap), ``corrupt`` records and ``rejected`` spans (refused for
    good by the collector) are totals over every process that used the spool since the last purge.

    .. versionadded:: 0.1.0
    """

    directory: str | None
    segments: int
    spans: int
    bytes: int
    oldest_age: float | None
    dropped: int
    corrupt: int
    leased: int
    memory_only: bool
    rejected: int = 0


@dataclass
class _Handle:
    pending: str
    lease: str
    spans: int
    fd: int  # holds the lease's lock until ack() or release()
    pid: int  # a handle inherited through fork() is not the child's to settle


class _Refused(Exception):
    pass


def _encode_record(payload: bytes, span_count: int, created_ns: int) -> bytes:
    fields = _REC_FIELDS.pack(len(payload), span_count, created_ns)
    crc = zlib.crc32(payload, zlib.crc32(fields))
    return _REC_HEAD.pack(_REC_MAGIC, len(payload), span_count, created_ns, crc) + payload


def _segment(payload: bytes, span_count: int, created_ns: int) -> bytes:
    return _FILE_MAGIC + _encode_record(payload, span_count, created_ns)


def _parse_records(data: bytes) -> tuple[list[tuple[bytes, int, int]], int]:
    """Valid records ``(payload, span_count, created_ns)`` and how many damaged stretches were skipped."""
    records: list[tuple[bytes, int, int]] = []
    corrupt = 0
    in_damage = False
    pos = len(_FILE_MAGIC)
    size = len(data)
    while pos < size:
        end = pos + _REC_HEAD.size
        if end <= size:
            magic, length, spans, created, crc = _REC_HEAD.unpack_from(data, pos)
            if magic == _REC_MAGIC and end + length <= size:
                payload = data[end : end + length]
                fields = _REC_FIELDS.pack(length, spans, created)
                if zlib.crc32(payload, zlib.crc32(fields)) == crc:
                    records.append((payload, spans, created))
                    pos = end + length
                    in_damage = False
                    continue
        if not in_damage:
            corrupt += 1
            in_damage = True
        nxt = data.find(_REC_MAGIC, pos + 1)
        if nxt < 0:
            break
        pos = nxt
    return records, corrupt


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value > 0:
        return value
    with contextlib.suppress(Exception):
        warnings.warn(
            f"ctxprop: ignoring {name}={raw!r}: expected a positive number", RuntimeWarning, stacklevel=3
        )
    return default


def _check_parent(path: Path) -> None:
    """Whoever controls the parent can swap the spool directory: only this user or root may."""
    st = os.stat(path.parent)
    if st.st_uid not in (os.geteuid(), 0):
        raise _Refused(f"{path.parent} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise _Refused(f"{path.parent} is writable by every user and not sticky")


def _open_private_dir(path: Path) -> int:
    if fcntl is None:
        raise _Refused("file locks (fcntl) are not available on this platform")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_parent(path)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as exc:
        if os.path.islink(path):
            raise _Refused(f"{path} is a symbolic link; a spool is never opened through one") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode):
            raise _Refused(f"{path} is not a directory")
        if st.st_uid != os.geteuid():
            raise _Refused(f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Spool:
    """A bounded, per-user store of OTLP requests that could not be sent yet.

    Never raises into the caller: an unusable directory or a full disk degrades it to memory only, with
    one ``RuntimeWarning``. Drops (size or age cap) and corrupt records are counted in ``ctxprop.stats()``.

    >>> import tempfile
    >>> spool = Spool.open(tempfile.mkdtemp())
    >>> spool.append(b"<ExportTraceServiceRequest bytes>", span_count=3)
    >>> spool.replay(lambda payload, timeout: True, deadline=float("inf"))
    3

    .. versionadded:: 0.1.0
    """

    def __init__(self, directory: Path, dir_fd: int | None, max_bytes: int, max_age: float) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.fsync = True
        self._fd = dir_fd
        self._writable = dir_fd is not None
        self._warned = False
        #: Why the spool is memory-only (None while it uses its directory).
        self.problem: str | None = None
        # Re-entrant: ctxprop's SIGTERM handler spools from the main thread, which may be inside one of
        # these short sections when the signal arrives.
        self._lock = threading.RLock()
        self._memory: deque[tuple[bytes, int, int]] = deque()
        self._memory_bytes = 0
        # Every descriptor on which this process holds a spool lock (leases, segments being sent, temp
        # files being written, probes), so a child forked meanwhile can close its copies; and the subset
        # holding write-ahead leases.
        self._locked: set[int] = set()
        self._held: set[int] = set()
        self._finalizer: Callable[[], object] = lambda: None
        _open_spools.add(self)

    def _after_fork_in_child(self) -> None:
        # The parent keeps (and sends) what it held in memory; a copy here would be sent twice. A lock
        # held by one of the parent's threads at fork() would never be released here.
        self._lock = threading.RLock()
        self._memory = deque()
        self._memory_bytes = 0
        # Copies of the parent's lease locks: closing them here leaves the parent's locks in place, and
        # keeps a parent that dies first from looking alive through this child.
        # Close, never unlock: an unlock here would release the parent's locks too.
        _close_all(self._locked)
        self._held.clear()

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int | None = None,
        max_age: float | None = None,
        fsync: bool | None = None,
    ) -> Spool:
        """Open (creating it 0700 if needed) the spool in ``directory``; never raises.

        ``max_bytes`` defaults to ``CTXPROP_SPOOL_MAX_BYTES``, else 64 MiB; ``max_age`` (seconds) to
        ``CTXPROP_SPOOL_MAX_AGE``, else 7 days. A symbolic link, another user's directory or one that
        cannot be created gives a memory-only spool and one ``RuntimeWarning``. A directory of this user
        with a wider mode is repaired to 0700.

        ``fsync`` (default: ``CTXPROP_SPOOL_FSYNC``, else on) makes each durable write-ahead batch reach
        the disk before its export starts, so it survives a power cut or kernel crash too. A write alone
        already survives ``kill -9`` and ``os._exit`` (the kernel holds it), so it can be turned off
        where the disk is slow and only process deaths matter.
        """
        path = Path(directory)
        if max_bytes is None:
            max_bytes = int(_env_number("CTXPROP_SPOOL_MAX_BYTES", _DEFAULT_MAX_BYTES))
        if max_age is None:
            max_age = _env_number("CTXPROP_SPOOL_MAX_AGE", _DEFAULT_MAX_AGE)
        spool = cls(path, None, max_bytes, max_age)
        if fsync is None:
            setting = os.environ.get("CTXPROP_SPOOL_FSYNC", "1").strip().lower()
            fsync = setting not in ("0", "false", "no", "off")
        spool.fsync = fsync
        try:
            spool._fd = _open_private_dir(path)
            spool._writable = True
            # A spool dropped without close() (an init() after close()) must not keep its descriptors.
            # Not at exit: the endings' last flush may still write to the spool then.
            spool._finalizer = weakref.finalize(spool, _close_all, spool._locked, spool._fd)
            spool._finalizer.atexit = False
        except Exception as exc:  # noqa: BLE001 - any failure here means memory-only, never an app error
            spool._degrade(str(exc) if isinstance(exc, _Refused) else f"cannot open {path}: {exc}")
            return spool
        spool._housekeeping()
        return spool

    # -- writing -------------------------------------------------------------------------------------

    def append(self, payload: bytes, span_count: int) -> None:
        """Keep ``payload`` (serialized OTLP request bytes holding ``span_count`` spans) for a later send."""
        try:
            created = time.time_ns()
            if self._writable:
                try:
                    name = self._new_name(created, span_count)
                    self._write_file(name, _segment(payload, span_count, created), sync=False)
                except OSError as exc:
                    self._degrade(f"cannot write to {self.directory}: {exc}")
                else:
                    _stats.incr("spool_written_spans", span_count)
                    self._enforce_bounds()
                    return
            self._memory_append(payload, span_count, created)
        except Exception:  # noqa: BLE001 - the telemetry path never raises into the application
            _stats.incr("spool_dropped_spans", span_count)

    def write_ahead(self, payload: bytes, span_count: int) -> object | None:
        """Durable mode: put a batch on disk (one fsync) before it is exported; returns a handle or None.

        The record is leased by this process while its export runs, so no replay sends it meanwhile;
        ``ack(handle)`` removes it, ``release(handle)`` makes it pending. If the process dies first, the
        lease is recovered and the next ``replay()`` (of any process) sends it. None means it could not be
        written (memory-only spool, or too many batches in flight): export it anyway and ``append`` it if
        that fails.
        """
        if not self._writable:
            return None
        if len(self._held) >= _MAX_HELD:
            _stats.incr("spool_write_ahead_skipped_spans", span_count)
            return None
        try:
            created = time.time_ns()
            pending = self._new_name(created, span_count)
            lease = f"{pending}.lease-{os.getpid()}"
            fd = self._write_file(lease, _segment(payload, span_count, created), sync=self.fsync, keep=True)
            with self._lock:
                self._held.add(fd)
            return _Handle(pending, lease, span_count, fd, os.getpid())
        except OSError as exc:
            self._degrade(f"cannot write to {self.directory}: {exc}")
        except Exception:  # noqa: BLE001, S110 - never raise into the worker; the caller exports anyway
            pass
        return None

    def ack(self, handle: object) -> None:
        """The batch written ahead under ``handle`` was delivered: forget it."""
        fd = self._settle(handle)
        if fd is not None:
            assert isinstance(handle, _Handle)  # noqa: S101 - _settle checked it
            with contextlib.suppress(OSError):
                os.unlink(handle.lease, dir_fd=self._fd)
            self._unlock(fd)

    def release(self, handle: object) -> None:
        """The export of the batch written ahead under ``handle`` failed: it becomes a pending record."""
        fd = self._settle(handle)
        if fd is None:
            return
        assert isinstance(handle, _Handle)  # noqa: S101 - _settle checked it
        try:
            os.rename(handle.lease, handle.pending, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except OSError:
            return
        finally:
            self._unlock(fd)
        _stats.incr("spool_written_spans", handle.spans)
        with contextlib.suppress(Exception):
            self._enforce_bounds()

    def _settle(self, handle: object) -> int | None:
        """The descriptor holding ``handle``'s lock, taken out of this spool's care; None when ``handle`` is
        not a live write-ahead handle of this process (unknown, settled already, or from before a fork)."""
        if not isinstance(handle, _Handle) or handle.pid != os.getpid() or self._fd is None:
            return None
        with self._lock:
            fd = handle.fd
            if fd not in self._held:
                return None
            self._held.discard(fd)
            handle.fd = -1  # a second ack/release must not close a descriptor number reused since
        return fd

    # -- sending -------------------------------------------------------------------------------------

    def replay(
        self,
        send: Callable[[bytes, float], object],
        deadline: float,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Send what is pending, oldest first, until done, a send fails or ``deadline`` (monotonic) passes.

        ``send(payload, timeout_s)`` returns True when the collector acknowledged the request (or an
        outcome with ``.ok``; one with ``.permanent`` set drops that record, counted, as unsendable).
        Each segment is leased before it is read, so concurrent replays (threads or processes) never send
        one twice, and it is removed only after every record in it was acknowledged. Returns the spans
        delivered; ``progress(spans)`` is called after each acknowledged record.
        """
        delivered = 0
        try:
            delivered, ok = self._replay_memory(send, deadline, progress)
            if ok and self._fd is not None:
                self._housekeeping()
                for name in self._pending():
                    if time.monotonic() >= deadline:
                        break
                    fd = self._lock_file(name)
                    if fd is None:
                        continue  # gone, or another replay (here or in another process) holds it
                    try:
                        lease = f"{name}.lease-{os.getpid()}"
                        if not self._same_file(name, fd):
                            continue  # another replay took it between our open and our lock
                        try:
                            os.rename(name, lease, src_dir_fd=self._fd, dst_dir_fd=self._fd)
                        except FileNotFoundError:
                            continue
                        sent, ok = self._send_segment(name, lease, fd, send, deadline, progress)
                    finally:
                        self._unlock(fd)
                    delivered += sent
                    if not ok:
                        break
        except Exception:  # noqa: BLE001, S110 - a broken spool must not break the exporting thread
            pass
        if delivered:
            _stats.incr("spool_replayed_spans", delivered)
        return delivered

    def has_pending(self) -> bool:
        """Whether anything waits to be sent (a directory listing, and a lock probe per lease)."""
        if self._memory:
            return True
        if self._fd is None:
            return False
        try:
            for name in os.listdir(self._fd):
                if _SEGMENT_RE.match(name):
                    return True
                if _LEASE_RE.match(name) and not self._held_elsewhere(name):
                    return True
        except OSError:
            return False
        return False

    # -- inspection and maintenance ----------------------------------------------------------------------

    def status(self) -> SpoolStatus:
        """Segments, spans, bytes and age of what waits, plus the drops and corrupt records on record."""
        segments = spans = size = leased = 0
        oldest: int | None = None
        dropped = corrupt = rejected = 0
        with self._lock:
            for _payload, n, created in self._memory:
                segments += 1
                spans += n
                size += len(_payload)
                oldest = created if oldest is None else min(oldest, created)
        if self._fd is not None:
            for _name, created, n, nbytes, live_lease in self._entries():
                if live_lease:
                    leased += 1
                    continue
                segments += 1
                spans += n
                size += nbytes
                oldest = created if oldest is None else min(oldest, created)
            dropped, corrupt, rejected = self._read_events()
        age = None if oldest is None else max(0.0, (time.time_ns() - oldest) / 1e9)
        return SpoolStatus(
            directory=str(self.directory),
            segments=segments,
            spans=spans,
            bytes=size,
            oldest_age=age,
            dropped=dropped,
            corrupt=corrupt,
            leased=leased,
            memory_only=not self._writable,
            rejected=rejected,
        )

    def purge(self) -> int:
        """Delete everything pending (not batches another live process is sending); returns spans removed."""
        removed = 0
        with self._lock:
            removed += sum(n for _p, n, _c in self._memory)
            self._memory.clear()
            self._memory_bytes = 0
        if self._fd is None:
            return removed
        with contextlib.suppress(OSError):
            self._recover_leases()
            for name in self._pending():
                fd = self._lock_file(name)
                if fd is None:
                    continue  # being sent by a replay right now
                try:
                    os.unlink(name, dir_fd=self._fd)
                    removed += _spans_of(name)
                except FileNotFoundError:
                    pass
                finally:
                    self._unlock(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_EVENTS, dir_fd=self._fd)
        return removed

    def close(self) -> None:
        """Release the directory descriptor (the spool is memory-only afterwards).

        Write-ahead batches not yet acknowledged stay on disk, for the next replay to send.
        """
        with self._lock:
            self._fd, self._writable = None, False
            self._finalizer()
            self._held.clear()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------------

    def _degrade(self, reason: str) -> None:
        self._writable = False
        self.problem = reason
        with self._lock:
            if self._warned:
                return
            self._warned = True
        _stats.incr("spool_memory_only")
        # Under ``-W error`` the warning is an exception: it must still not reach the application.
        with contextlib.suppress(Exception):
            warnings.warn(
                f"ctxprop: the offline spool is unusable ({reason}); spans that cannot be sent are kept in "
                "memory only and are lost if the process ends before the collector is back. Point "
                "CTXPROP_SPOOL_DIR or init(spool_dir=...) at a private, writable directory.",
                RuntimeWarning,
                stacklevel=2,
            )

    def _new_name(self, created: int, span_count: int) -> str:
        return f"seg-{created:020d}-{os.getpid()}-{secrets.token_hex(4)}-{span_count}.ctxs"

    def _write_file(self, name: str, data: bytes, *, sync: bool, keep: bool = False) -> int:
        """Write the segment ``data`` to ``name``, through a locked temp file renamed when complete.

        ``sync`` makes the data and the new directory entry reach the disk before this returns. ``keep``
        returns the descriptor still holding the lock (a lease: locked before its name exists, so nobody
        ever sees it unlocked while this process lives); otherwise it is closed and -1 returned.
        """
        assert self._fd is not None  # noqa: S101 - callers check _writable, which implies a descriptor
        tmp, fd = self._new_locked_temp()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                # fdatasync: the data and the size needed to read it back, without the mtime.
                getattr(os, "fdatasync", os.fsync)(fd)
            os.rename(tmp, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self._fd)
            self._unlock(fd)
            raise
        try:
            if sync:
                # A new name is durable only once its directory is: without this, a power cut can keep
                # the data and lose the entry that leads to it.
                os.fsync(self._fd)
        except BaseException:
            self._unlock(fd)
            raise
        if keep:
            return fd
        self._unlock(fd)
        return -1

    def _new_locked_temp(self) -> tuple[str, int]:
        """A new temp file, already locked by us, and its name."""
        assert self._fd is not None  # noqa: S101 - only called with a descriptor
        for _attempt in range(3):
            tmp = f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600, dir_fd=self._fd)
            self._locked.add(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                # A housekeeping probe holds it this very instant (it only looks): take another name.
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=self._fd)
                self._locked.discard(fd)
                os.close(fd)
                continue
            return tmp, fd
        raise OSError(errno.EWOULDBLOCK, "new temp files in the spool are locked by another process")

    def _unlock(self, fd: int) -> None:
        """Release a lock of ours (for the description: a forked child's copy must not keep it) and close."""
        self._locked.discard(fd)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _memory_append(self, payload: bytes, span_count: int, created: int) -> None:
        with self._lock:
            self._memory.append((payload, span_count, created))
            self._memory_bytes += len(payload)
            while self._memory_bytes > self.max_bytes and self._memory:
                old, n, _c = self._memory.popleft()
                self._memory_bytes -= len(old)
                _stats.incr("spool_dropped_spans", n)
                _stats.incr("spool_dropped_segments")

    def _replay_memory(
        self,
        send: Callable[[bytes, float], object],
        deadline: float,
        progress: Callable[[int], None] | None,
    ) -> tuple[int, bool]:
        delivered = 0
        while True:
            with self._lock:
                if not self._memory:
                    return delivered, True
                item = self._memory.popleft()
                self._memory_bytes -= len(item[0])
            verdict = _attempt(send, item[0], deadline)
            if verdict is _FAILED:
                with self._lock:
                    self._memory.appendleft(item)
                    self._memory_bytes += len(item[0])
                return delivered, False
            if verdict is _REJECTED:
                _stats.incr("spool_rejected_spans", item[1])
                continue
            delivered += item[1]
            _report(progress, item[1])

    def _read_segment(self, name: str) -> bytes | None:
        assert self._fd is not None  # noqa: S101 - only called with a descriptor
        try:
            fd = os.open(name, os.O_RDONLY | _NONBLOCK | _NOFOLLOW, dir_fd=self._fd)
        except OSError:
            return None
        try:
            return _read_own_file(fd)
        finally:
            os.close(fd)

    def _lock_file(self, name: str) -> int | None:
        """A descriptor of ``name`` holding its exclusive lock; None when it is gone or someone holds it.

        A symbolic link planted under a spool name is removed, never followed.
        """
        assert self._fd is not None  # noqa: S101 - only called with a descriptor
        try:
            fd = os.open(name, os.O_RDONLY | _NONBLOCK | _NOFOLLOW, dir_fd=self._fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=self._fd)
            return None
        self._locked.add(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._locked.discard(fd)
            os.close(fd)
            return None
        return fd

    def _same_file(self, name: str, fd: int) -> bool:
        """Whether ``name`` still names the file open as ``fd`` (it may have moved while we waited)."""
        try:
            st = os.stat(name, dir_fd=self._fd, follow_symlinks=False)
        except OSError:
            return False
        mine = os.fstat(fd)
        return (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev)

    def _held_elsewhere(self, name: str) -> bool:
        """Whether a live process (this one included) holds ``name`` locked, or it is gone."""
        fd = self._lock_file(name)
        if fd is None:
            return True
        self._unlock(fd)
        return False

    def _send_segment(
        self,
        name: str,
        lease: str,
        fd: int,
        send: Callable[[bytes, float], object],
        deadline: float,
        progress: Callable[[int], None] | None,
    ) -> tuple[int, bool]:
        """Send the records of the segment leased as ``lease`` and read through ``fd`` (holding its lock)."""
        assert self._fd is not None  # noqa: S101 - only called with a descriptor
        data = _read_own_file(fd)
        if data is None:
            # Not a regular file of ours (planted): never send it, never keep it.
            with contextlib.suppress(OSError):
                os.unlink(lease, dir_fd=self._fd)
            return 0, True
        records, corrupt = _parse_records(data)
        if corrupt:
            _stats.incr("spool_corrupt_records", corrupt)
            self._note_event("corrupt", corrupt)
        delivered = 0
        for index, (payload, spans, _created) in enumerate(records):
            verdict = _attempt(send, payload, deadline)
            if verdict is _FAILED:
                try:
                    self._give_back(name, lease, records[index:], intact=index == 0 and not corrupt)
                except OSError:
                    # Cannot rewrite the rest (disk full?): keep the whole segment rather than a lease
                    # nobody would recover while we live; its delivered records may be sent again.
                    with contextlib.suppress(OSError):
                        os.rename(lease, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
                return delivered, False
            if verdict is _REJECTED:
                # The collector refuses this request for good: keeping it would block everything after it.
                _stats.incr("spool_rejected_spans", spans)
                self._note_event("rejected", spans)
                corrupt = 1  # the segment no longer matches the file: a give-back must rewrite it
                continue
            delivered += spans
            _report(progress, spans)
        with contextlib.suppress(OSError):
            os.unlink(lease, dir_fd=self._fd)
        return delivered, True

    def _give_back(self, name: str, lease: str, rest: list[tuple[bytes, int, int]], *, intact: bool) -> None:
        assert self._fd is not None  # noqa: S101 - only called with a descriptor
        if intact:
            os.rename(lease, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
            return
        # Part of the segment was delivered: only the rest goes back, so nothing is sent twice. The rest
        # replaces the lease in one rename first, so a crash at any point leaves one copy of it, never two.
        data = _FILE_MAGIC + b"".join(_encode_record(p, n, c) for p, n, c in rest)
        fd = self._write_file(lease, data, sync=self.fsync, keep=True)
        try:
            new_name = self._new_name(rest[0][2], sum(r[1] for r in rest))
            os.rename(lease, new_name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        finally:
            self._unlock(fd)

    def _pending(self) -> list[str]:
        assert self._fd is not None  # noqa: S101 - only called with a descriptor
        return sorted(n for n in os.listdir(self._fd) if _SEGMENT_RE.match(n))

    def _entries(self) -> Iterator[tuple[str, int, int, int, bool]]:
        """(name, created_ns, spans, bytes, leased by a live process) of every segment and lease."""
        assert self._fd is not None  # noqa: S101 - only called with a descriptor
        for name in os.listdir(self._fd):
            m = _SEGMENT_RE.match(name)
            lm = None if m else _LEASE_RE.match(name)
            if not (m or lm):
                continue
            try:
                nbytes = os.stat(name, dir_fd=self._fd, follow_symlinks=False).st_size
            except OSError:
                continue
            if m:
                yield name, int(m.group(1)), int(m.group(4)), nbytes, False
            elif lm:
                yield name, int(lm.group(2)), int(lm.group(3)), nbytes, self._held_elsewhere(name)

    def _recover_leases(self) -> None:
        """Leases and temp files nobody holds locked (their owner died): leases go back to pending, temp
        files past the grace period go."""
        assert self._fd is not None  # noqa: S101 - only called with a descriptor
        for name in os.listdir(self._fd):
            lm = _LEASE_RE.match(name)
            if not (lm or _TMP_RE.match(name)):
                continue
            fd = self._lock_file(name)
            if fd is None:
                continue
            try:
                if lm:
                    if self._same_file(name, fd):  # not a file that took the name since we opened it
                        os.rename(name, lm.group(1), src_dir_fd=self._fd, dst_dir_fd=self._fd)
                elif time.time() - os.fstat(fd).st_mtime > _TMP_GRACE:
                    os.unlink(name, dir_fd=self._fd)
            except OSError:
                pass
            finally:
                self._unlock(fd)

    def _housekeeping(self) -> None:
        with contextlib.suppress(Exception):
            self._recover_leases()
            self._enforce_bounds()

    def _enforce_bounds(self) -> None:
        """Drop the oldest pending segments while over the size cap, and any older than the age cap."""
        assert self._fd is not None  # noqa: S101 - only called with a descriptor
        self._drop_over_caps(sorted(self._entries()))

    def _drop_over_caps(self, entries: list[tuple[str, int, int, int, bool]]) -> None:
        """Drop from ``entries`` (a listing, oldest first, perhaps already stale) what exceeds the caps."""
        assert self._fd is not None  # noqa: S101 - only called with a descriptor
        total = sum(e[3] for e in entries)
        expiry = time.time_ns() - int(self.max_age * 1e9)
        dropped_spans = dropped_segments = 0
        for name, created, spans, nbytes, live_lease in entries:
            if live_lease or not _SEGMENT_RE.match(name):
                continue
            if total <= self.max_bytes and created >= expiry:
                continue
            # Its bytes leave the count either way: dropped here, or dropped or leased by another process
            # since the listing. Counting them still would drop a newer segment in its place.
            total -= nbytes
            try:
                os.unlink(name, dir_fd=self._fd)
            except FileNotFoundError:
                continue
            dropped_spans += spans
            dropped_segments += 1
        if dropped_segments:
            _stats.incr("spool_dropped_spans", dropped_spans)
            _stats.incr("spool_dropped_segments", dropped_segments)
            self._note_event("dropped", dropped_spans)

    def _note_event(self, kind: str, n: int) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NONBLOCK | _NOFOLLOW
            fd = os.open(_EVENTS, flags, 0o600, dir_fd=self._fd)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    return
                # One short O_APPEND write: lines from concurrent processes never interleave.
                os.write(fd, f"{kind} {n}\n".encode("ascii"))
            finally:
                os.close(fd)
            if st.st_size >= _EVENTS_MAX:
                # Long enough: replace it by its totals (a line another process appends meanwhile may be
                # lost; far better than counts that stop growing).
                totals = self._read_events()
                kinds = ("dropped", "corrupt", "rejected")
                lines = "".join(f"{k} {v}\n" for k, v in zip(kinds, totals, strict=True))
                self._write_file(_EVENTS, lines.encode("ascii"), sync=False)

    def _read_events(self) -> tuple[int, int, int]:
        """(dropped spans, corrupt records, rejected spans) noted by every process that used the spool."""
        totals = dict.fromkeys(("dropped", "corrupt", "rejected"), 0)
        data = self._read_segment(_EVENTS) if self._fd is not None else None
        for line in (data or b"").decode("ascii", "replace").splitlines():
            kind, _, count = line.partition(" ")
            if kind in totals and count.isdigit():
                totals[kind] += int(count)
        return totals["dropped"], totals["corrupt"], totals["rejected"]


_DELIVERED, _REJECTED, _FAILED = "delivered", "rejected", "failed"


def _attempt(send: Callable[[bytes, float], object], payload: bytes, deadline: float) -> str:
    """One send within what is left of ``deadline``.

    ``send`` may answer a bool, or an outcome with ``ok`` and ``permanent`` attributes (the pipeline's
    sender): a permanent refusal (e.g. HTTP 400) is not worth keeping, anything else is retried later.
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return _FAILED
    try:
        answer = send(payload, remaining)
    except Exception:  # noqa: BLE001 - a failing sender is a failed send
        return _FAILED
    if isinstance(answer, bool):
        return _DELIVERED if answer else _FAILED
    if getattr(answer, "ok", False) is True:
        return _DELIVERED
    if getattr(answer, "permanent", False) is True:
        return _REJECTED
    return _FAILED


def _report(progress: Callable[[int], None] | None, spans: int) -> None:
    if progress is not None:
        with contextlib.suppress(Exception):
            progress(spans)


_open_spools: weakref.WeakSet[Spool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for spool in list(_open_spools):
        spool._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _close_all(held: set[int], dir_fd: int | None = None) -> None:
    """Close the lease descriptors in ``held`` (emptying it) and ``dir_fd``."""
    fds = [*held, *([] if dir_fd is None else [dir_fd])]
    held.clear()
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _read_own_file(fd: int) -> bytes | None:
    """The content of ``fd``; None unless it is a regular file of this user (never send a planted one)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        return None
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _spans_of(name: str) -> int:
    m = _SEGMENT_RE.match(name)
    return int(m.group(4)) if m else 0
