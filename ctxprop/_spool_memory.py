"""The memory-only spool: used when no spool directory is usable (or a disk spool's disk fails).

Bounded by ``max_bytes`` like the disk spool (oldest dropped and counted). Nothing here survives the
process: what is still held at ``close()`` (the pipeline closes the spool last, after its final replay)
is counted as dropped. Every span this spool loses (cap or close) is counted twice: in the spool's total
``spool_dropped_spans`` and in ``spool_dropped_memory_spans``, the key the books use (memory only ever
holds this process's spans, while the disk spool's total also counts other processes' spans).

>>> spool = MemorySpool("unusable", max_bytes=100, max_age=60)
>>> spool.append(b"x" * 10, 2)
>>> spool.has_pending(), spool.status().spans
(True, 2)
>>> spool.replay(lambda payload, timeout: True, float("inf"))
2
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
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
from ctxprop._spool_format import Record

__all__ = ["MemorySpool"]


class MemorySpool(Spool):
    """Records in a deque, oldest first; never raises."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: float,
        max_age: float,
        problem: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.fsync = False
        self.problem = problem
        # Re-entrant: ctxprop's SIGTERM handler spools from the main thread, which may be inside one of
        # these short sections when the signal arrives.
        self._lock = threading.RLock()
        self._records: deque[Record] = deque()
        self._bytes = 0
        self._closed = False
        register_open(self)

    @property
    def memory_only(self) -> bool:
        return True

    def _after_fork_in_child(self) -> None:
        # The parent keeps (and sends) what it held in memory; a copy here would be sent twice. A lock
        # held by one of the parent's threads at fork() would never be released here.
        self._lock = threading.RLock()
        self._records = deque()
        self._bytes = 0

    def append(self, payload: bytes, span_count: int) -> None:
        if self._closed:
            # Closed: nothing will replay it, and the process is ending.
            _stats.incr("spool_dropped_spans", span_count)
            _stats.incr("spool_dropped_memory_spans", span_count)
            return
        created = time.time_ns()
        with self._lock:
            self._records.append(Record(payload, span_count, created))
            self._bytes += len(payload)
            self._enforce_bounds()

    def _enforce_bounds(self) -> None:
        # Caller holds the lock.
        expiry = time.time_ns() - self.max_age * 1e9
        while self._records and (self._bytes > self.max_bytes or self._records[0].created_ns < expiry):
            old = self._records.popleft()
            self._bytes -= len(old.payload)
            _stats.incr("spool_dropped_spans", old.spans)
            # Memory holds only this process's spans: the books count them dropped under this key.
            _stats.incr("spool_dropped_memory_spans", old.spans)
            _stats.incr("spool_dropped_segments")

    def write_ahead(self, payload: bytes, span_count: int) -> object | None:
        return None  # memory is not durable: the caller exports, and appends if that fails

    def ack(self, handle: object) -> None:
        return None

    def release(self, handle: object) -> None:
        return None

    def replay(
        self,
        send: Send,
        deadline: float,
        *,
        timeout: float | None = None,
        progress: Progress | None = None,
    ) -> int:
        delivered, _ok = self.replay_some(send, deadline, timeout, progress)
        if delivered:
            _stats.incr("spool_replayed_spans", delivered)
        return delivered

    def replay_some(
        self, send: Send, deadline: float, timeout: float | None, progress: Progress | None
    ) -> tuple[int, bool]:
        """``replay()`` without its counting: (spans delivered, whether everything was sent)."""
        delivered = 0
        while True:
            with self._lock:
                if not self._records:
                    return delivered, True
                item = self._records.popleft()
                self._bytes -= len(item.payload)
            verdict = attempt(send, item.payload, deadline, timeout)
            if verdict in (FAILED, UNCERTAIN):
                if verdict is UNCERTAIN:
                    _stats.incr("spool_uncertain_spans", item.spans)
                with self._lock:
                    self._records.appendleft(item)
                    self._bytes += len(item.payload)
                return delivered, False
            if verdict is REJECTED:
                _stats.incr("spool_rejected_spans", item.spans)
                continue
            delivered += item.spans
            report(progress, item.spans)

    def has_pending(self) -> bool:
        return bool(self._records)

    def status(self) -> SpoolStatus:
        with self._lock:
            records = list(self._records)
        oldest = min((r.created_ns for r in records), default=None)
        return SpoolStatus(
            directory=str(self.directory),
            segments=len(records),
            spans=sum(r.spans for r in records),
            bytes=sum(len(r.payload) for r in records),
            oldest_age=None if oldest is None else max(0.0, (time.time_ns() - oldest) / 1e9),
            dropped=0,
            corrupt=0,
            leased=0,
            memory_only=True,
            rejected=0,
        )

    def purge(self) -> int:
        with self._lock:
            removed = sum(r.spans for r in self._records)
            self._records.clear()
            self._bytes = 0
        return removed

    def take_all(self) -> list[Record]:
        """Remove and return everything held (a disk spool moves its overflow back to disk)."""
        with self._lock:
            records = list(self._records)
            self._records.clear()
            self._bytes = 0
        return records

    def close(self) -> None:
        """What is still held dies with the process: count it as dropped, once."""
        self._closed = True
        lost = sum(r.spans for r in self.take_all())
        if lost:
            _stats.incr("spool_dropped_spans", lost)
            _stats.incr("spool_dropped_memory_spans", lost)
