"""The disk spool: a private directory of segment files, shared safely by concurrent processes (POSIX).

Layout of a spool directory (0700, owned by the user, opened once with ``O_NOFOLLOW`` and then only used
through its file descriptor, so a path swapped later cannot redirect a write):

- ``seg-<created_ns>-<pid>-<rand>-<spans>.ctxs``: a complete pending segment (files are 0600, format in
  ``_spool_format``). The name carries the creation time and the span count, so ordering, age and
  ``status()`` need a listing only.
- ``<segment>.lease-<pid>``: a segment some process is sending right now (or, in durable mode, a batch
  written ahead of its export). Its owner holds an exclusive ``flock()`` on it from before the name
  exists until it is done, and a lease is taken by one atomic ``rename()`` of a segment already locked:
  of two processes only one wins, so no segment is sent twice. A lease nobody holds locked (its owner
  died: the kernel drops the lock with the process, in any pid namespace) goes back to pending.
- ``.tmp-<pid>-<rand>``: a segment being written (locked by its writer); renamed to its final name only
  when complete.
- ``events``: an append-only log of drops and corrupt records, so ``status()`` reports them across processes.

When writing fails mid-run (disk full, directory gone), the spool degrades: later records are kept by a
:class:`~ctxprop._spool_memory.MemorySpool` inside it, with one ``RuntimeWarning``.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import secrets
import stat
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ctxprop import _stats
from ctxprop._spool import (
    FAILED,
    REJECTED,
    UNCERTAIN,
    Progress,
    Send,
    Spool,
    SpoolStatus,
    attempt,
    register_open,
    report,
)
from ctxprop._spool_format import Record, parse_records, segment, segment_of
from ctxprop._spool_memory import MemorySpool

try:
    import fcntl
except ImportError:  # not POSIX: the spool is memory-only there
    fcntl = None  # type: ignore[assignment]

__all__ = ["DiskSpool", "open_disk_spool"]

SEGMENT_RE = re.compile(r"^seg-(\d{20})-(\d+)-([0-9a-f]{8})-(\d+)\.ctxs$")
LEASE_RE = re.compile(r"^(seg-(\d{20})-\d+-[0-9a-f]{8}-(\d+)\.ctxs)\.lease-[0-9a-f-]+$")
_TMP_RE = re.compile(r"^\.tmp-(\d+)-[0-9a-f]{8}$")
_EVENTS = "events"
_EVENTS_MAX = 1 << 20
# A writer creates its temp file, then locks it: an unlocked one younger than this may be in between.
_TMP_GRACE = 60.0
# Each write-ahead batch in flight holds a descriptor (its lease's lock). Tiny batches piling up behind a
# collector that says "retry later" must not take the application's descriptors: past this many, a
# batch is exported without a write-ahead copy (counted), and spooled as usual if its export fails.
MAX_HELD = 128

# getattr: these flags are POSIX-only; elsewhere the spool opens memory-only instead of failing to import.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
# Opening a FIFO planted under a spool name would otherwise wait forever for its other end.
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW

#: (name, created_ns, spans, bytes, leased by a live process) of a segment or lease.
_Entry = tuple[str, int, int, int, bool]


@dataclass
class Handle:
    """A batch written ahead: its pending and lease names, and the descriptor holding its lock."""

    pending: str
    lease: str
    spans: int
    fd: int  # holds the lease's lock until ack() or release()
    pid: int  # a handle inherited through fork() is not the child's to settle


class _Refused(Exception):
    pass


def _check_parent(path: Path) -> None:
    """Whoever controls the parent can swap the spool directory: only this user or root may."""
    st = os.stat(path.parent)
    if st.st_uid not in (os.geteuid(), 0):
        raise _Refused(f"{path.parent} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise _Refused(f"{path.parent} is writable by every user and not sticky")


def _make_private_parents(path: Path) -> None:
    """Create ``path`` and its missing parents, each 0700 (``Path.mkdir(parents=True)`` would give the
    parents the umask's mode: 0777 under umask 000)."""
    missing = []
    while not os.path.lexists(path) and path.parent != path:
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)


def _open_private_dir(path: Path, *, read_only: bool = False) -> int:
    """A descriptor of the spool directory ``path``, created 0700 (with its missing parents) unless
    ``read_only``; a wider mode of this user's directory is repaired, unless ``read_only``."""
    if fcntl is None:
        raise _Refused("file locks (fcntl) are not available on this platform")
    if not read_only:
        _make_private_parents(path.parent)
    _check_parent(path)
    if not read_only:
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
        if stat.S_IMODE(st.st_mode) != 0o700 and not read_only:
            os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def warn_memory_only(reason: str) -> None:
    """The one warning of a spool that keeps spans in memory only; never raises (even under ``-W error``)."""
    _stats.incr("spool_memory_only")
    with contextlib.suppress(Exception):
        warnings.warn(
            f"ctxprop: the offline spool is unusable ({reason}); spans that cannot be sent are kept in "
            "memory only and are lost if the process ends before the collector is back. Point "
            "CTXPROP_SPOOL_DIR or init(spool_dir=...) at a private, writable directory.",
            RuntimeWarning,
            stacklevel=4,
        )


def open_disk_spool(
    path: Path, *, max_bytes: float, max_age: float, fsync: bool, read_only: bool = False
) -> Spool:
    """A :class:`DiskSpool` on ``path``, or a :class:`MemorySpool` (one warning) where it is unusable."""
    try:
        fd = _open_private_dir(path, read_only=read_only)
    except Exception as exc:  # noqa: BLE001 - any failure here means memory-only, never an app error
        reason = str(exc) if isinstance(exc, _Refused) else f"cannot open {path}: {exc}"
        warn_memory_only(reason)
        return MemorySpool(path, max_bytes=max_bytes, max_age=max_age, problem=reason)
    spool = DiskSpool(path, fd, max_bytes=max_bytes, max_age=max_age, fsync=fsync, read_only=read_only)
    if not read_only:
        spool._housekeeping()
    return spool


class DiskSpool(Spool):
    """The spool in a private directory; see the module docstring for its layout."""

    def __init__(
        self,
        directory: Path,
        dir_fd: int,
        *,
        max_bytes: float,
        max_age: float,
        fsync: bool,
        read_only: bool = False,
    ) -> None:
        self.directory = directory
        #: Looks only (``spool status``): never creates, moves or deletes a file.
        self.read_only = read_only
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.fsync = fsync
        self.problem = None
        self._fd: int | None = dir_fd
        self._writable = not read_only
        # Re-entrant: ctxprop's SIGTERM handler spools from the main thread, which may be inside one of
        # these short sections when the signal arrives.
        self._lock = threading.RLock()
        # Where records go once the disk fails (or after close()).
        self._overflow = MemorySpool(directory, max_bytes=max_bytes, max_age=max_age)
        # Every descriptor on which this process holds a spool lock (leases, segments being sent, temp
        # files being written, probes), so a child forked meanwhile can close its copies; and the subset
        # holding write-ahead leases.
        self._locked: set[int] = set()
        self._held: set[int] = set()
        # A spool dropped without close() (an init() after close()) must not keep its descriptors.
        # Not at exit: the endings' last flush may still write to the spool then.
        self._finalizer: Callable[[], object] = weakref.finalize(self, _close_all, self._locked, dir_fd)
        self._finalizer.atexit = False
        register_open(self)

    @property
    def memory_only(self) -> bool:
        return not self._writable and not self.read_only

    def _after_fork_in_child(self) -> None:
        # A lock held by one of the parent's threads at fork() would never be released here.
        self._lock = threading.RLock()
        # Copies of the parent's lease locks: closing them here leaves the parent's locks in place, and
        # keeps a parent that dies first from looking alive through this child.
        # Close, never unlock: an unlock here would release the parent's locks too.
        _close_all(self._locked)
        self._held.clear()

    # -- writing -------------------------------------------------------------------------------------

    def append(self, payload: bytes, span_count: int) -> None:
        try:
            if self._writable:
                created = time.time_ns()
                try:
                    name = self._new_name(created, span_count)
                    self._write_file(name, segment(payload, span_count, created), sync=False)
                except OSError as exc:
                    self._degrade(f"cannot write to {self.directory}: {exc}")
                else:
                    _stats.incr("spool_written_spans", span_count)
                    self._enforce_bounds()
                    return
            self._overflow.append(payload, span_count)
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
        if len(self._held) >= MAX_HELD:
            _stats.incr("spool_write_ahead_skipped_spans", span_count)
            return None
        try:
            created = time.time_ns()
            pending = self._new_name(created, span_count)
            lease = f"{pending}.lease-{os.getpid()}"
            fd = self._write_file(lease, segment(payload, span_count, created), sync=self.fsync, keep=True)
            with self._lock:
                self._held.add(fd)
            return Handle(pending, lease, span_count, fd, os.getpid())
        except OSError as exc:
            self._degrade(f"cannot write to {self.directory}: {exc}")
        except Exception:  # noqa: BLE001, S110 - never raise into the worker; the caller exports anyway
            pass
        return None

    def ack(self, handle: object) -> None:
        fd = self._settle(handle)
        if fd is not None:
            assert isinstance(handle, Handle)  # noqa: S101 - _settle checked it
            with contextlib.suppress(OSError):
                os.unlink(handle.lease, dir_fd=self._fd)
            self._unlock(fd)

    def release(self, handle: object) -> None:
        fd = self._settle(handle)
        if fd is None:
            return
        assert isinstance(handle, Handle)  # noqa: S101 - _settle checked it
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
        if not isinstance(handle, Handle) or handle.pid != os.getpid() or self._fd is None:
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
        send: Send,
        deadline: float,
        *,
        timeout: float | None = None,
        progress: Progress | None = None,
    ) -> int:
        """Send what is pending, oldest first, until done, a send fails or ``deadline`` (monotonic) passes.

        Each segment is leased before it is read, so concurrent replays (threads or processes) never send
        one twice, and it is removed only after every record in it was acknowledged.
        """
        if self.read_only:
            return 0
        delivered = 0
        try:
            delivered, ok = self._overflow.replay_some(send, deadline, timeout, progress)
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
                        sent, ok = self._send_segment(name, lease, fd, send, deadline, timeout, progress)
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
        if self._overflow.has_pending():
            return True
        if self._fd is None:
            return False
        try:
            for name in os.listdir(self._fd):
                if SEGMENT_RE.match(name):
                    return True
                if LEASE_RE.match(name) and not self._held_elsewhere(name):
                    return True
        except OSError:
            return False
        return False

    # -- inspection and maintenance ----------------------------------------------------------------------

    def status(self) -> SpoolStatus:
        mem = self._overflow.status()
        segments, spans, size = mem.segments, mem.spans, mem.bytes
        leased = 0
        oldest: int | None = None
        if mem.oldest_age is not None:
            oldest = time.time_ns() - int(mem.oldest_age * 1e9)
        dropped = corrupt = rejected = 0
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
            memory_only=self.memory_only,
            rejected=rejected,
        )

    def purge(self) -> int:
        removed = self._overflow.purge()
        if self._fd is None or self.read_only:
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
        """Release the directory descriptor; records only memory held are counted as dropped.

        Write-ahead batches not yet acknowledged stay on disk, for the next replay to send.
        """
        with self._lock:
            self._fd, self._writable = None, False
            self._finalizer()
            self._held.clear()
        self._overflow.close()

    # -- internals -------------------------------------------------------------------------------------

    def _degrade(self, reason: str) -> None:
        with self._lock:
            self._writable = False
            if self.problem is not None:
                return
            self.problem = reason
        warn_memory_only(reason)

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
            if exc.errno == errno.ELOOP and not self.read_only:
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
        send: Send,
        deadline: float,
        timeout: float | None,
        progress: Progress | None,
    ) -> tuple[int, bool]:
        """Send the records of the segment leased as ``lease`` and read through ``fd`` (holding its lock)."""
        assert self._fd is not None  # noqa: S101 - only called with a descriptor
        data = _read_own_file(fd)
        if data is None:
            # Not a regular file of ours (planted): never send it, never keep it.
            with contextlib.suppress(OSError):
                os.unlink(lease, dir_fd=self._fd)
            return 0, True
        records, corrupt = parse_records(data)
        if corrupt:
            _stats.incr("spool_corrupt_records", corrupt)
            self._note_event("corrupt", corrupt)
        delivered = 0
        for index, record in enumerate(records):
            verdict = attempt(send, record.payload, deadline, timeout)
            if verdict in (FAILED, UNCERTAIN):
                if verdict is UNCERTAIN:
                    _stats.incr("spool_uncertain_spans", record.spans)
                try:
                    self._give_back(name, lease, records[index:], intact=index == 0 and not corrupt)
                except OSError:
                    # Cannot rewrite the rest (disk full?): keep the whole segment rather than a lease
                    # nobody would recover while we live; its delivered records may be sent again.
                    with contextlib.suppress(OSError):
                        os.rename(lease, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
                return delivered, False
            if verdict is REJECTED:
                # The collector refuses this request for good: keeping it would block everything after it.
                _stats.incr("spool_rejected_spans", record.spans)
                self._note_event("rejected", record.spans)
                corrupt = 1  # the segment no longer matches the file: a give-back must rewrite it
                continue
            delivered += record.spans
            report(progress, record.spans)
        with contextlib.suppress(OSError):
            os.unlink(lease, dir_fd=self._fd)
        return delivered, True

    def _give_back(self, name: str, lease: str, rest: list[Record], *, intact: bool) -> None:
        assert self._fd is not None  # noqa: S101 - only called with a descriptor
        if intact:
            os.rename(lease, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
            return
        # Part of the segment was delivered: only the rest goes back, so nothing is sent twice. The rest
        # replaces the lease in one rename first, so a crash at any point leaves one copy of it, never two.
        fd = self._write_file(lease, segment_of(rest), sync=self.fsync, keep=True)
        try:
            new_name = self._new_name(rest[0].created_ns, sum(r.spans for r in rest))
            os.rename(lease, new_name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        finally:
            self._unlock(fd)

    def _pending(self) -> list[str]:
        assert self._fd is not None  # noqa: S101 - only called with a descriptor
        return sorted(n for n in os.listdir(self._fd) if SEGMENT_RE.match(n))

    def _entries(self) -> Iterator[_Entry]:
        """(name, created_ns, spans, bytes, leased by a live process) of every segment and lease."""
        assert self._fd is not None  # noqa: S101 - only called with a descriptor
        for name in os.listdir(self._fd):
            m = SEGMENT_RE.match(name)
            lm = None if m else LEASE_RE.match(name)
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
            lm = LEASE_RE.match(name)
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

    def _drop_over_caps(self, entries: list[_Entry]) -> None:
        """Drop from ``entries`` (a listing, oldest first, perhaps already stale) what exceeds the caps."""
        assert self._fd is not None  # noqa: S101 - only called with a descriptor
        total = sum(e[3] for e in entries)
        # No cap (inf) must not become an overflow, nor an expiry in the future.
        expiry = time.time_ns() - int(self.max_age * 1e9) if math.isfinite(self.max_age) else -1
        dropped_spans = dropped_segments = 0
        for name, created, spans, nbytes, live_lease in entries:
            if live_lease or not SEGMENT_RE.match(name):
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
    m = SEGMENT_RE.match(name)
    return int(m.group(4)) if m else 0
