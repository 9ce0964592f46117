"""Who owns each batch, and the books: the processor's half that moves batches and counts spans.

A span is in exactly one place at a time: the queue; a batch waiting for its next attempt or in flight
(the processor's memory); the spool; or settled (exported, rejected, dropped). ``Ledger`` makes each move
once, under the processor's lock, and counts it: the keys ``stats()`` balances (``spans_ended`` =
``spans_exported`` + ``spans_rejected`` + ``spans_dropped`` + ``spans_pending``) come from here. It also
holds the hand-over at a deadline: what is left goes to the spool (the OTLP path), a batch still in flight
at close gets a leased spool copy that its acknowledgement removes again, and a custom exporter's leftovers
are dropped and counted.

The constructor's settings follow the SDK's ``BatchSpanProcessor``: :func:`settings` applies its defaults
(``OTEL_BSP_*``) and its validation, with the same messages.

>>> settings(100, 1000, 10, None)
(100, 1000, 10, 10000.0)
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from typing import Any

from ctxprop import _stats
from ctxprop._encoding import Queued, encode
from ctxprop._transport import SendOutcome

__all__ = ["SENDING", "SETTLED", "WAITING", "Batch", "Ledger", "settings"]

_log = logging.getLogger("ctxprop.processor")

_DEFAULT_QUEUE = 8192
_DEFAULT_BATCH = 512
_DEFAULT_DELAY_MS = 1000.0
_DEFAULT_EXPORT_TIMEOUT_MS = 10000.0

# Batch owners.
WAITING, SENDING, SETTLED = "waiting", "sending", "settled"


class Batch:
    __slots__ = (
        "attempts",
        "copy",
        "count",
        "deadline",
        "first_failure",
        "handle",
        "not_before",
        "on_books",
        "payload",
        "seq",
        "spans",
        "stalled",
        "state",
    )

    def __init__(self, spans: list[Queued], seq: int) -> None:
        self.spans: list[Queued] | None = spans
        self.payload: bytes | None = None
        self.count = len(spans)
        self.seq = seq  # position of its first span in the order spans left the queue
        self.state = SENDING
        self.attempts = 0
        self.first_failure = 0.0
        self.not_before = 0.0
        self.deadline: float | None = None  # a flush's deadline bounds the request made for it
        self.handle: Any = None  # durable mode: the spool's write-ahead handle
        self.copy: Any = None  # a spool copy written at close while the batch was in flight
        self.on_books = "memory"  # where the books count it: memory, spool, or done
        self.stalled = False


def _env_int(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        return default  # the SDK logs and falls back to its default; ctxprop falls back silently


def settings(
    max_queue_size: int | None,
    schedule_delay_millis: float | None,
    max_export_batch_size: int | None,
    export_timeout_millis: float | None,
) -> tuple[int, float, int, float]:
    """The SDK's defaulting (argument, else ``OTEL_BSP_*``, else ctxprop's default) and validation."""
    queue = (
        int(_env_int("OTEL_BSP_MAX_QUEUE_SIZE", _DEFAULT_QUEUE)) if max_queue_size is None else max_queue_size
    )
    delay = (
        _env_int("OTEL_BSP_SCHEDULE_DELAY", _DEFAULT_DELAY_MS)
        if schedule_delay_millis is None
        else schedule_delay_millis
    )
    batch = max_export_batch_size
    if batch is None:
        batch = int(_env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", _DEFAULT_BATCH))
    timeout = export_timeout_millis
    if timeout is None:
        timeout = _env_int("OTEL_BSP_EXPORT_TIMEOUT", _DEFAULT_EXPORT_TIMEOUT_MS)
    _validate(queue, delay, batch)
    if timeout <= 0:
        timeout = _DEFAULT_EXPORT_TIMEOUT_MS  # as the SDK: a non-positive timeout means "default"
    return queue, delay, batch, timeout


def _validate(max_queue_size: int, schedule_delay_millis: float, max_export_batch_size: int) -> None:
    # The same checks and messages as the SDK's BatchSpanProcessor.
    if max_queue_size <= 0:
        raise ValueError("max_queue_size must be a positive integer.")
    if schedule_delay_millis <= 0:
        raise ValueError("schedule_delay_millis must be positive.")
    if max_export_batch_size <= 0:
        raise ValueError("max_export_batch_size must be a positive integer.")
    if max_export_batch_size > max_queue_size:
        raise ValueError("max_export_batch_size must be less than or equal to max_queue_size.")



class Ledger:
    """The processor's batch moves and counters (a base class of ``CtxpropSpanProcessor``)."""

    _lock: threading.RLock
    _queue: deque[Queued]
    _waiting: list[Batch]
    _inflight: Batch | None
    _memory_spans: int
    _undelivered: int
    _taken: int
    _batch_size: int
    _max_queue: int
    _spool: Any
    _tally: deque[tuple[str, int]]
    _totals: dict[str, int]
    _fold_lock: threading.Lock
    _pid: int
    _down: bool
    _want_replay: bool
    _replay_at: float
    _replay_backoff: float
    _last_error: str
    _logged_error: bool

    # -- settling (each move of a batch happens once, under the lock) ----------------------------------
    def _release(self, batch: Batch) -> tuple[str, Any]:
        """Take ``batch`` out of the processor's care: (where the books had it, its spool copy or None).
        Caller holds the lock."""
        batch.state = SETTLED
        if self._inflight is batch:
            self._inflight = None
        if batch in self._waiting:
            self._waiting.remove(batch)
        was = batch.on_books
        if was == "memory":
            self._memory_spans -= batch.count
        batch.on_books = "done"
        copy, batch.copy = batch.copy, None
        return was, copy

    def _unbook(self, was: str, n: int) -> None:
        if was == "spool":
            self._count("spans_spooled", -n)
            self._count("spooled", -n)
        elif was == "abandoned":
            self._count("dropped_export_abandoned", -n)

    def _settle_answered(self, batch: Batch, out: SendOutcome) -> None:
        with self._lock:
            if batch.state is SETTLED:
                return
            was, copy = self._release(batch)
        for handle in (batch.handle, copy):
            if handle is not None:
                self._spool_call("ack", handle)
        self._unbook(was, batch.count)
        if out.permanent:
            # The collector refused this payload for good (4xx): retrying cannot help; count it.
            self._count("rejected", batch.count)
            self._count("spans_rejected", batch.count)
            self._note_error(f"collector refused a batch of {batch.count} spans (HTTP {out.status})")
            return
        rejected = min(batch.count, out.rejected)
        if rejected or out.message:
            self._count("rejected", rejected)
            self._count("spans_rejected", rejected)
            self._note_error(out.message or f"collector rejected {rejected} spans")
        self._count("exported", batch.count - rejected)
        self._count("spans_exported", batch.count - rejected)
        if self._down or (self._spool is not None and self._spool_call("has_pending")):
            self._want_replay = True
            self._replay_at = 0.0
            self._replay_backoff = 0.0
        self._down = False

    def _settle_undelivered(self, batch: Batch) -> str | None:
        """Settle ``batch`` as not delivered: where the books had it, or None when nothing is left to do.

        Nothing is left when it was settled already, or when a copy of it was written to the spool at
        close: that copy becomes the spool's record (the spool has its spans now, whether the batch was
        to be dropped or spooled)."""
        with self._lock:
            if batch.state is SETTLED:
                return None
            was, copy = self._release(batch)
        self._undelivered += 1
        if copy is not None:
            self._spool_call("release", copy)
            return None
        return was

    def _drop(self, batch: Batch, reason: str) -> None:
        was = self._settle_undelivered(batch)
        if was is None:
            return
        self._unbook(was, batch.count)
        self._count(reason, batch.count)

    def _to_spool(self, batch: Batch, why: str) -> None:
        """Hand ``batch`` to the spool (its one owner from now on)."""
        was = self._settle_undelivered(batch)
        if was is None:
            return
        if batch.payload is None and not self._encode_for_spool(batch):
            self._unbook(was, batch.count)
            return
        if batch.handle is not None:
            self._spool_call("release", batch.handle)
        else:
            self._spool_call("append", batch.payload or b"", batch.count)
        if was != "spool":
            self._unbook(was, batch.count)
            self._count("spooled", batch.count)
            self._count("spans_spooled", batch.count)

    def _encode_for_spool(self, batch: Batch) -> bool:
        try:
            payload, count, dropped = encode(batch.spans or [])
        except Exception:  # noqa: BLE001 - counted, never raised
            self._count("dropped_unencodable", batch.count)
            return False
        self._count("dropped_unencodable", dropped)
        batch.payload, batch.count = payload, count
        return count > 0

    def _enforce_memory_bound(self) -> None:
        # Failed batches held in memory count against the queue bound; the oldest leave first: to the spool
        # when there is one, else dropped and counted. Caller holds the lock.
        while len(self._waiting) > 1 and self._memory_spans + len(self._queue) > self._max_queue:
            old = self._waiting[0]
            if self._spool is not None:
                self._to_spool(old, "memory_bound")
            else:
                self._drop(old, "dropped_export_failed")

    def _note_error(self, message: str) -> None:
        self._last_error = message[:512]
        if not self._logged_error:
            self._logged_error = True
            _log.debug("ctxprop export: %s", self._last_error)

    @property
    def last_error(self) -> str:
        """The last refusal the collector explained (a partial_success error_message, or an HTTP status)."""
        return self._last_error

    # -- counters --------------------------------------------------------------------------------------
    def _count(self, name: str, n: int) -> None:
        if n == 0:
            return
        self._tally.append((name, n))
        _stats.incr(name, n)

    @property
    def counters(self) -> dict[str, int]:
        """This processor's counters (exported, retried, spooled, dropped_*, ...): a snapshot."""
        return self._fold()

    def _fold(self) -> dict[str, int]:
        with self._fold_lock:
            tally, totals = self._tally, self._totals
            while tally:  # only folders pop, and they hold the fold lock
                name, n = tally.popleft()
                totals[name] = totals.get(name, 0) + n
            return dict(totals)

    def _books_live(self) -> tuple[int, int]:
        """(spans queued, spans in batches the books hold in memory): the live part of stats()."""
        if self._pid != os.getpid():
            return 0, 0
        return len(self._queue), self._memory_spans

    # -- the spool ------------------------------------------------------------------------------------
    def _spool_call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._spool, name)(*args)
        except Exception:  # noqa: BLE001 - the spool promises not to raise; be sure of it
            self._count("spool_errors", 1)
            return None

    # -- the hand-over at a deadline --------------------------------------------------------------------
    def _leftovers(self, *, closing: bool) -> None:
        """At a deadline: the spool takes what is queued or waiting (OTLP path); at close also a leased
        copy of the batch in flight. A custom exporter's leftovers stay, or at close are dropped."""
        with self._lock:
            waiting = list(self._waiting)
            inflight = self._inflight
            spans: list[Queued] = []
            if self._spool is not None or closing:
                q = self._queue
                while q:
                    try:
                        spans.append(q.popleft())
                    except IndexError:
                        break
            cut: list[Batch] = []
            for i in range(0, len(spans), self._batch_size):
                chunk = spans[i : i + self._batch_size]
                b = Batch(chunk, self._taken)
                self._taken += len(chunk)
                self._memory_spans += len(chunk)
                self._count("spans_ended", len(chunk))
                b.state = WAITING
                cut.append(b)
        if self._spool is not None:
            for b in (*waiting, *cut):
                self._to_spool(b, "deadline")
            if closing and inflight is not None:
                self._copy_inflight(inflight)
            return
        if closing:
            for b in (*waiting, *cut):
                self._drop(b, "dropped_close_timeout")
            if inflight is not None:
                self._abandon(inflight)

    def _copy_inflight(self, batch: Batch) -> None:  # noqa: PLR0911 - each early return is a settled race
        """Closing while ``batch`` is in flight: write a leased copy to the spool. If the request is then
        acknowledged the copy is removed; if it fails, or the process ends first, the spool keeps it."""
        with self._lock:
            if batch.state is not SENDING or batch.copy is not None or batch.on_books != "memory":
                return
            if batch.handle is not None:
                # Durable mode: it is on disk already, under this process's lease.
                self._memory_spans -= batch.count
                batch.on_books = "spool"
                self._count("spooled", batch.count)
                self._count("spans_spooled", batch.count)
                return
            payload = batch.payload
            spans = batch.spans
        if payload is None:
            try:
                payload, count, _ = encode(spans or [])
            except Exception:  # noqa: BLE001 - the worker counts it when it encodes the batch itself
                return
            if count != batch.count:
                return  # the worker drops the unencodable spans and counts them when it encodes
        handle = self._spool_call("write_ahead", payload, batch.count)
        if handle is None:
            # No lease possible (memory-only spool, too many held): a plain record. Should the request
            # still succeed, those spans arrive twice; without it they would be lost at exit.
            with self._lock:
                if batch.state is not SENDING:
                    return
                self._release(batch)
            self._spool_call("append", payload, batch.count)
            self._count("spooled", batch.count)
            self._count("spans_spooled", batch.count)
            return
        with self._lock:
            if batch.state is SENDING:
                batch.copy = handle
                self._memory_spans -= batch.count
                batch.on_books = "spool"
                handle = None
        if handle is not None:
            self._spool_call("ack", handle)  # settled meanwhile: the copy is not needed
            return
        self._count("spooled", batch.count)
        self._count("spans_spooled", batch.count)

    def _abandon(self, batch: Batch) -> None:
        """Closing while a custom exporter's ``export()`` still runs: count its spans as abandoned (moved
        to exported or rejected should it return after all)."""
        with self._lock:
            if batch.state is not SENDING or batch.on_books != "memory":
                return
            self._memory_spans -= batch.count
            batch.on_books = "abandoned"
        self._count("dropped_export_abandoned", batch.count)
