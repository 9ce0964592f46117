"""ctxprop's batching span processor: O(1) ``on_end``, one export thread, nothing silently discarded.

``on_end`` appends to a bounded deque and, when a batch is full, sets an Event; that is all the
application thread pays. One daemon worker (started lazily, so a forked child gets its own) takes
batches, encodes each once and sends it. A failed batch is retried with capped backoff that honours
``Retry-After``; if the collector stays away, the encoded batch goes to the spool (OTLP path) or stays in
memory within the queue bound (custom exporter), and every span dropped is counted.

``flush_until(deadline)`` runs in the caller's thread under the same export lock as the worker and never
passes its deadline by more than the time to write leftovers to the spool.

>>> from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
>>> p = CtxpropSpanProcessor(exporter=InMemorySpanExporter())
>>> p.force_flush(1000)
True
>>> p.shutdown()
"""

from __future__ import annotations

import os
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, attach, detach, set_value
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from ctxprop import _stats
from ctxprop._encoding import encode
from ctxprop._export import OK, SendOutcome

if TYPE_CHECKING:
    from opentelemetry.context import Context

__all__ = ["CtxpropSpanProcessor"]

Sender = Callable[[bytes, float], SendOutcome]

_BACKOFF_BASE = 0.1
_BACKOFF_CAP = 5.0
# A Retry-After longer than this is treated as "collector away": the batch is spooled, not held.
_RETRY_AFTER_CAP = 30.0
# How long one batch may keep failing in the background before it is spooled.
_GIVE_UP_AFTER = 10.0
# Background replay of the spool works in slices so new batches are never held up for long.
_REPLAY_SLICE = 1.0
# After a replay the collector refused, probe it again after this long, doubling up to the cap.
_REPLAY_BACKOFF_START = 2.0
_REPLAY_BACKOFF_CAP = 60.0


class _Batch:
    __slots__ = ("attempts", "count", "first_failure", "handle", "not_before", "payload", "spans", "spooled")

    def __init__(self, spans: list[ReadableSpan] | None, payload: bytes | None, count: int) -> None:
        self.spans = spans
        self.payload = payload
        self.count = count
        self.attempts = 0
        self.first_failure = 0.0
        self.not_before = 0.0
        self.handle: Any = None
        self.spooled = False


def _backoff(attempts: int) -> float:
    base: float = min(_BACKOFF_CAP, _BACKOFF_BASE * 2.0 ** max(0, attempts - 1))
    return base * random.uniform(0.8, 1.2)  # noqa: S311


class CtxpropSpanProcessor(SpanProcessor):
    """Batches ended spans and exports them from one background thread.

    Give it either ``sender`` (ctxprop's OTLP path: encoded bytes, spool on give-up) or ``exporter`` (any
    OTel ``SpanExporter``). ``init()`` builds and installs it; build one yourself only for a provider you
    manage by hand.

    >>> from opentelemetry.sdk.trace import TracerProvider
    >>> from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    >>> provider = TracerProvider()
    >>> provider.add_span_processor(CtxpropSpanProcessor(exporter=InMemorySpanExporter()))

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        *,
        exporter: SpanExporter | None = None,
        sender: Sender | None = None,
        spool: Any = None,
        max_queue_size: int = 8192,
        max_export_batch_size: int = 512,
        schedule_delay: float = 1.0,
        export_timeout: float = 10.0,
        durable: bool = False,
        give_up_after: float = _GIVE_UP_AFTER,
    ) -> None:
        if (exporter is None) == (sender is None):
            raise ValueError("CtxpropSpanProcessor needs exactly one of exporter= or sender=")
        self._exporter = exporter
        self._sender = sender
        self._spool = spool if sender is not None else None
        self._durable = durable and self._spool is not None
        self._max_queue = max_queue_size
        self._limit = max_queue_size  # 0 once shut down: on_end then drops through its one length check
        self._batch_size = max_export_batch_size
        self._schedule_delay = schedule_delay
        self._export_timeout = export_timeout
        self._give_up_after = give_up_after
        # Counting never takes a lock: on_end's drop path runs on application threads (often the main
        # thread), and a SIGTERM handler running close() on top of it, or the worker holding the export
        # lock, must never wait for a lock that interrupted frame holds. Increments go to a deque (append
        # is atomic) and are folded into totals by whoever reads them, under a lock no counter takes.
        self._tally: deque[tuple[str, int]] = deque()
        self._totals: dict[str, int] = {}
        self._fold_lock = threading.Lock()
        self._init_runtime_state()
        self._shut = False
        self._stopping = False
        if hasattr(os, "register_at_fork"):
            weak = weakref.WeakMethod(self._after_fork_in_child)

            def _after_in_child() -> None:
                method = weak()
                if method is not None:
                    method()

            os.register_at_fork(after_in_child=_after_in_child)

    def _init_runtime_state(self) -> None:
        self._queue: deque[ReadableSpan] = deque()
        self._pending: deque[_Batch] = deque()
        self._pending_spans = 0
        self._inflight: _Batch | None = None
        self._export_lock = threading.Lock()
        # Who holds the export lock, and what that holder took out of the queue: spans being encoded
        # (_held) and the batch being delivered (_current). A signal handler that interrupted the holder on
        # its own thread cannot wait for the lock; it takes these over instead (_abandoned_to_spool).
        self._owner: int | None = None
        self._held: list[ReadableSpan] | None = None
        self._current: _Batch | None = None
        # One replay at a time in this process: close() must wait for a background replay that holds
        # leased segments rather than exit under it.
        self._replay_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._wake = threading.Event()
        self._signalled = False
        self._worker: threading.Thread | None = None
        self._worker_started = False
        self._start_retry_at = 0.0
        self._down = False
        self._want_replay = False
        self._replay_at = 0.0
        self._replay_backoff = 0.0
        self._last_export = time.monotonic()
        self._pid = os.getpid()

    def _after_fork_in_child(self) -> None:
        # The child must neither export the parent's queued spans nor use its locks or thread.
        self._init_runtime_state()
        self._fold_lock = threading.Lock()
        reset = getattr(self._sender, "reset_after_fork", None)
        if reset is not None:
            reset()

    # -- the application thread ------------------------------------------------------------------------
    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return

    def on_end(self, span: ReadableSpan) -> None:
        if not span.context.trace_flags.sampled:
            return
        q = self._queue
        if len(q) >= self._limit:
            self._drop_on_end()
            return
        q.append(span)
        if len(q) >= self._batch_size and not self._signalled:
            self._signalled = True
            self._wake.set()
        if not self._worker_started:
            self._start_worker()

    def _drop_on_end(self) -> None:
        self._count("dropped_after_shutdown" if self._shut else "dropped_queue_full", 1)

    def _check_pid(self) -> None:
        # Backup for the at-fork hook (a fork that bypassed it, e.g. through a C extension): a child must
        # never export what its parent queued.
        if self._pid != os.getpid():
            self._after_fork_in_child()

    def _start_worker(self) -> None:
        self._check_pid()
        with self._start_lock:
            if self._worker_started or time.monotonic() < self._start_retry_at:
                return
            self._worker_started = True
        t = threading.Thread(target=self._run, name="ctxprop-exporter", daemon=True)
        self._worker = t
        try:
            t.start()
        except RuntimeError:
            # No new thread now: interpreter shutdown (Python 3.12+ refuses threads in atexit handlers) or
            # a thread limit. The spans wait in the queue for flush()/close(), which export in the calling
            # thread (at exit: ctxprop's own atexit close); a later span tries the worker again.
            self._worker = None
            self._start_retry_at = time.monotonic() + 1.0
            self._worker_started = False
            self._count("worker_start_errors", 1)

    # -- counters --------------------------------------------------------------------------------------
    def _count(self, name: str, n: int) -> None:
        if n <= 0:
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

    @property
    def queue_length(self) -> int:
        """Spans waiting in the queue (not yet batched)."""
        return len(self._queue)

    @property
    def pending_spans(self) -> int:
        """Spans in batches that failed and wait for a retry."""
        return self._pending_spans

    # -- the worker ------------------------------------------------------------------------------------
    def _is_stopping(self) -> bool:
        return self._stopping

    def _run(self) -> None:
        while not self._is_stopping():
            timeout = self._schedule_delay
            now = time.monotonic()
            if self._pending:
                timeout = max(0.0, min(timeout, self._pending[0].not_before - now))
            if self._replay_at:
                if now >= self._replay_at:
                    self._replay_at = 0.0
                    self._want_replay = True
                    timeout = 0.0
                else:
                    timeout = min(timeout, self._replay_at - now)
            timer = not self._wake.wait(timeout)
            self._wake.clear()
            if len(self._tally) > 1024:
                self._fold()  # drops counted while nobody reads the counters stay a short deque
            self._signalled = False
            if self._is_stopping():
                return
            token = attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
            try:
                self._export_lock.acquire()
                self._owner = threading.get_ident()
                try:
                    self._cycle(deadline=None, everything=timer)
                finally:
                    self._owner = None
                    self._export_lock.release()
                self._background_replay()
            except Exception:  # noqa: BLE001 - the export thread must survive any exporter fault
                self._count("export_errors", 1)
            finally:
                detach(token)

    def _background_replay(self) -> None:
        if not self._want_replay or self._spool is None or self._sender is None:
            return
        self._want_replay = False
        if not self._replay_lock.acquire(blocking=False):
            return
        try:
            if not self._spool.has_pending():
                return
            # The slice bounds when requests start, never how long one may take: a request cut short
            # after the collector kept it would be sent again (the spool's replay() explains the edges).
            sent = self._spool.replay(
                self._sender, time.monotonic() + _REPLAY_SLICE, timeout=self._export_timeout
            )
            self._count("replayed", sent)
            if not self._spool.has_pending() or self._is_stopping():
                self._replay_backoff = 0.0
            elif sent > 0:
                # Progress: go on with the next slice at once.
                self._want_replay = True
                self._wake.set()
            else:
                # The collector refused the replay: probe again later, backing off, not in a hot loop.
                # A successful export re-arms the replay sooner.
                self._replay_backoff = min(
                    _REPLAY_BACKOFF_CAP, max(_REPLAY_BACKOFF_START, self._replay_backoff * 2)
                )
                self._replay_at = time.monotonic() + self._replay_backoff
        except Exception:  # noqa: BLE001 - a spool fault must not stop exporting
            self._count("spool_errors", 1)
        finally:
            self._replay_lock.release()

    def request_replay(self) -> None:
        """Ask the worker to send what the spool holds (after ``init()``, or when the collector is back)."""
        if self._spool is None:
            return
        self._want_replay = True
        if not self._worker_started:
            self._start_worker()
        self._wake.set()

    # -- export cycle (caller holds the export lock) ---------------------------------------------------
    def _cycle(self, deadline: float | None, everything: bool) -> bool:
        """Retry due batches, then export the queue. True when nothing is left undelivered."""
        forced = deadline is not None
        if self._durable:
            # Group commit: every queued batch goes to disk now, even while an earlier one backs off, so
            # kill -9 loses at most one schedule delay of spans.
            self._write_ahead_queue(everything or forced)
        while self._pending:
            batch = self._pending[0]
            if not forced and batch.not_before > time.monotonic():
                return False
            self._current = batch
            settled = self._deliver(batch, deadline)
            self._current = None
            if not settled:
                return False
            self._pending.popleft()
            self._pending_spans -= batch.count
        q = self._queue
        while q and (everything or forced or len(q) >= self._batch_size):
            if forced and time.monotonic() >= deadline:  # type: ignore[operator]
                return False
            fresh = self._make_batch(self._take(min(self._batch_size, len(q))))
            self._current = fresh
            self._held = None
            if fresh is None:
                continue
            settled = self._deliver(fresh, deadline)
            self._current = None
            if not settled:
                self._pending.append(fresh)
                self._pending_spans += fresh.count
                self._enforce_memory_bound()
                return False
        return True

    def _write_ahead_queue(self, everything: bool) -> None:
        q = self._queue
        while q and (everything or len(q) >= self._batch_size):
            batch = self._make_batch(self._take(min(self._batch_size, len(q))))
            if batch is not None:
                self._pending.append(batch)
                self._pending_spans += batch.count
            self._held = None
        self._enforce_memory_bound()

    def _take(self, n: int) -> list[ReadableSpan]:
        # Filled in place, so a signal handler that interrupts the encoding still finds these spans.
        spans: list[ReadableSpan] = []
        self._held = spans
        q = self._queue
        for _ in range(n):
            spans.append(q.popleft())
        return spans

    def _make_batch(self, spans: list[ReadableSpan]) -> _Batch | None:
        if self._sender is None:
            return _Batch(spans, None, len(spans))
        try:
            payload, count, dropped = encode(spans)
        except Exception:  # noqa: BLE001 - an unencodable batch is counted, never raised
            self._count("dropped_unencodable", len(spans))
            return None
        # A span that cannot be encoded is dropped alone; the rest of its batch goes on.
        self._count("dropped_unencodable", dropped)
        if not count:
            return None
        batch = _Batch(None, payload, count)
        if self._durable:
            batch.handle = self._spool_call("write_ahead", payload, count)
        return batch

    def _attempt(self, batch: _Batch, timeout: float) -> SendOutcome:
        self._inflight = batch
        try:
            if self._sender is not None:
                return self._sender(batch.payload or b"", timeout)
            assert self._exporter is not None  # noqa: S101 - one of the two is set by __init__
            try:
                result = self._exporter.export(batch.spans or [])
            except Exception:  # noqa: BLE001 - a custom exporter's fault is a failed attempt
                return SendOutcome(False, retryable=True)
            return OK if result is SpanExportResult.SUCCESS else SendOutcome(False, retryable=True)
        finally:
            self._inflight = None

    def _deliver(self, batch: _Batch, deadline: float | None) -> bool:
        """Send ``batch``, retrying within ``deadline`` (flush) or once (worker). True when it is settled
        (delivered, rejected, or handed to the spool); False when it must wait for a later retry."""
        while True:
            now = time.monotonic()
            timeout = self._export_timeout
            if deadline is not None:
                timeout = min(timeout, deadline - now)
                if timeout <= 0:
                    return False
            out = self._attempt(batch, timeout)
            if batch.spooled:
                # close() already wrote this in-flight batch to the spool while we were sending it.
                return True
            if out.ok or out.permanent:
                self._settled(batch, out)
                return True
            batch.attempts += 1
            if batch.attempts == 1:
                batch.first_failure = now
            self._count("retried", batch.count)
            wait = out.retry_after if out.retry_after is not None else _backoff(batch.attempts)
            later = time.monotonic() + wait
            if deadline is None:
                return self._defer(batch, wait, later)
            if later >= deadline or wait > _RETRY_AFTER_CAP:
                return False
            if self._spool is not None and out.status is None and (self._down or batch.attempts >= 2):
                # Unreachable (refused, reset, timed out) twice: at a deadline, the spool is the better
                # place for these spans than the rest of the caller's time (a short script's exit).
                self._down = True
                return False
            self._sleep(wait)

    def _settled(self, batch: _Batch, out: SendOutcome) -> None:
        if batch.handle is not None:
            self._spool_call("ack", batch.handle)
        if out.permanent:
            # The collector refused this payload for good (4xx): retrying cannot help; count it.
            self._count("rejected", batch.count)
            return
        self._count("exported", batch.count)
        if self._down or (self._spool is not None and self._spool_call("has_pending")):
            self._want_replay = True
            self._replay_at = 0.0
            self._replay_backoff = 0.0
        self._down = False

    def _defer(self, batch: _Batch, wait: float, later: float) -> bool:
        """Background failure: schedule a retry, or spool the batch when the collector stays away."""
        too_long = (later - batch.first_failure) > self._give_up_after or wait > _RETRY_AFTER_CAP
        if self._spool is not None and (self._down or too_long):
            self._down = True
            return self._to_spool(batch)
        batch.not_before = later if wait <= _RETRY_AFTER_CAP else time.monotonic() + _BACKOFF_CAP
        return False

    def _sleep(self, seconds: float) -> None:
        # Backoff inside flush: nothing else may wake it, and the caller's deadline bounds it.
        threading.Event().wait(seconds)

    # -- spool -----------------------------------------------------------------------------------------
    def _spool_call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._spool, name)(*args)
        except Exception:  # noqa: BLE001 - the spool promises not to raise; be sure of it
            self._count("spool_errors", 1)
            return None

    def _to_spool(self, batch: _Batch) -> bool:
        if batch.spooled:
            return True
        batch.spooled = True
        if batch.handle is not None:
            self._spool_call("release", batch.handle)
        else:
            self._spool_call("append", batch.payload or b"", batch.count)
        self._count("spooled", batch.count)
        return True

    def _enforce_memory_bound(self) -> None:
        # Failed batches held in memory count against the queue bound; the oldest leave first: to the spool
        # when there is one, else dropped and counted.
        while len(self._pending) > 1 and self._pending_spans + len(self._queue) > self._max_queue:
            old = self._pending.popleft()
            self._pending_spans -= old.count
            if self._spool is not None:
                self._to_spool(old)
            else:
                self._count("dropped_export_failed", old.count)

    def _leftovers_to_spool(self, locked: bool) -> None:
        """At a deadline: encode what is still queued or pending and write it to the spool."""
        if self._spool is None:
            return
        if locked:
            while self._pending:
                b = self._pending.popleft()
                self._pending_spans -= b.count
                self._to_spool(b)
        elif self._shut:
            inflight = self._inflight
            if inflight is not None and inflight.payload is not None:
                # Closing, and the worker is stuck in a request: its batch may never be answered before
                # exit. (A plain flush leaves it to the worker: the request may still succeed, and a
                # spooled copy would then be delivered a second time.)
                self._to_spool(inflight)
        q = self._queue
        while q:
            spans = []
            try:
                for _ in range(min(self._batch_size, len(q))):
                    spans.append(q.popleft())
            except IndexError:
                pass
            if not spans:
                break
            made = self._make_batch(spans)
            if made is not None:
                self._to_spool(made)

    def _put_back(self) -> None:
        held, self._held = self._held, None
        if held:
            self._queue.extendleft(reversed(held))
        cur, self._current = self._current, None
        if cur is not None and not cur.spooled and (not self._pending or self._pending[0] is not cur):
            self._pending.appendleft(cur)
            self._pending_spans += cur.count

    def _abandoned_to_spool(self) -> None:
        """Closing from a signal handler on top of this thread's own export: spool what that export had
        taken (spans being encoded, the batch being sent, failed batches) and the queue."""
        if self._spool is None:
            return
        try:
            held, self._held = self._held, None
            batches = [b for b in (self._current, *self._pending) if b is not None]
            self._pending.clear()
            self._pending_spans = 0
            for b in batches:
                self._to_spool(b)
            if held:
                made = self._make_batch(list(held))
                if made is not None:
                    self._to_spool(made)
            self._leftovers_to_spool(locked=False)
        except Exception:  # noqa: BLE001 - runs in a signal handler: never raise
            self._count("spool_errors", 1)

    # -- flush / shutdown ------------------------------------------------------------------------------
    def flush_until(self, deadline: float) -> bool:
        """Export everything ended so far, in the calling thread, by ``deadline`` (``time.monotonic()``).

        What is still undelivered at the deadline goes to the spool (OTLP path). Never raises.
        """
        self._check_pid()
        if self._owner == threading.get_ident():
            # A signal handler (SIGTERM -> close() or flush()) interrupted this very thread while it held
            # the export lock: waiting for that lock would wait for ourselves until the deadline.
            if self._shut:
                self._abandoned_to_spool()  # the interrupted export never resumes: the process dies
            return False
        token = attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        try:
            # Keep a slice of the budget to write leftovers to the spool before the deadline.
            total = max(0.0, deadline - time.monotonic())
            work_deadline = deadline - min(0.3, total * 0.1) if self._spool is not None else deadline
            if not self._export_lock.acquire(timeout=max(0.0, work_deadline - time.monotonic())):
                self._leftovers_to_spool(locked=False)
                return False
            self._owner = threading.get_ident()
            try:
                done = self._cycle(deadline=work_deadline, everything=True)
                if not done:
                    self._leftovers_to_spool(locked=True)
                return done
            except BaseException:
                # KeyboardInterrupt (or an app's SIGTERM handler's SystemExit) raised in the middle of the
                # export: what it had taken out of the queue goes back, for the exit's close() to send.
                self._put_back()
                raise
            finally:
                self._owner = None
                self._export_lock.release()
        except Exception:  # noqa: BLE001 - flush is called from atexit and signal handlers: never raise
            self._count("export_errors", 1)
            return False
        finally:
            detach(token)

    def replay_until(self, deadline: float) -> int:
        """Send spooled payloads until ``deadline``; returns spans delivered."""
        if self._spool is None or self._sender is None:
            return 0
        if not self._replay_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return 0
        try:
            if time.monotonic() >= deadline or not self._spool_call("has_pending"):
                return 0
            sent = self._spool_call("replay", self._sender, deadline) or 0
        finally:
            self._replay_lock.release()
        self._count("replayed", int(sent))
        return int(sent)

    def shutdown_until(self, deadline: float) -> bool:
        """Flush, replay the spool in what remains, then stop the worker. Idempotent; never raises."""
        if self._shut:
            return True
        self._shut = True
        ok = self.flush_until(deadline)
        self._limit = 0
        if ok and not self._down:
            self.replay_until(deadline)
        # Spans that ended while we flushed still get their chance.
        if self._queue:
            ok = self.flush_until(deadline) and ok
        self._stopping = True
        self._wake.set()
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(max(0.0, min(0.2, deadline - time.monotonic())))
        if worker is None or not worker.is_alive():
            self._close_transport()
            if self._spool is not None:
                # Nothing writes to the spool any more: what only its memory holds dies with the process,
                # and close() counts it as dropped (the books balance).
                self._spool_call("close")
        return ok

    def _close_transport(self) -> None:
        try:
            if self._exporter is not None:
                self._exporter.shutdown()
            close = getattr(self._sender, "close", None)
            if close is not None:
                close()
        except Exception:  # noqa: BLE001 - shutting an exporter down must not raise into atexit
            self._count("export_errors", 1)

    def forget(self) -> None:
        """Drop everything queued without exporting, and stop (a pool worker that inherited the parent's
        pipeline through fork must not send the parent's spans)."""
        self._shut = True
        self._limit = 0
        self._queue.clear()
        self._pending.clear()
        self._pending_spans = 0
        self._stopping = True
        self._wake.set()
        close = getattr(self._sender, "close", None)
        if close is not None:
            close()

    # -- SpanProcessor API -----------------------------------------------------------------------------
    def shutdown(self) -> None:
        """``TracerProvider.shutdown()`` hook: like ``close()`` with a 3 s deadline."""
        self.shutdown_until(time.monotonic() + 3.0)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """``TracerProvider.force_flush()`` hook."""
        return self.flush_until(time.monotonic() + timeout_millis / 1000)

    def export_now(self, spans: Sequence[ReadableSpan]) -> None:
        """Queue already-ended spans (e.g. received from a worker process) as if they had just ended."""
        for s in spans:
            self.on_end(s)
