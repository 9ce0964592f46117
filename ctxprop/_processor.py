"""ctxprop's batching span processor: a drop-in ``BatchSpanProcessor`` whose every batch has one owner.

``on_end`` appends to a bounded deque (O(1), never blocks, no lock: ``deque.append`` is atomic with or
without the GIL) and wakes the export thread when a batch is full. That thread is the only one that
exports. It is started on demand (the first span, a flush, a spool to replay) and leaves when idle, and a
fork finds it parked, so ``os.fork()`` after ``init()`` or after ``flush()`` forks a single-threaded
process (no multi-threaded-fork warning on 3.12+).

A span is in exactly one place at a time: the queue; a batch (waiting for its next attempt, or in flight);
the spool; or settled (exported, rejected, dropped: each counted). Batch moves and the books are
``_batches``; retries and give-up follow the delivery policy (``_delivery``); the bytes go out through the
transport (``_transport``), whose requests end by their deadline. This module is the queue, its export
thread and the flush/shutdown waits.

``flush_until(deadline)`` asks the thread to send everything ended so far and waits for it, never past the
deadline; at the deadline what is left goes to the spool (the OTLP path) or stays queued (a custom
exporter; at close it is dropped and counted). A batch still in flight at close is also written to the
spool, under a lease: if its request is acknowledged after all, that copy is removed again.

>>> from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
>>> p = CtxpropSpanProcessor(InMemorySpanExporter())
>>> p.force_flush(1000)
True
>>> p.shutdown()
"""

from __future__ import annotations

import _thread
import contextlib
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import opentelemetry.context as otel_context
from opentelemetry.context import attach, detach, set_value
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from ctxprop import _encoding, _stats
from ctxprop._batches import SENDING, WAITING, Batch, Ledger, settings
from ctxprop._delivery import Policy, reserve_for_spool
from ctxprop._encoding import Queued, encode
from ctxprop._scopes import CURRENT, ISOLATION
from ctxprop._tagging import tag_span
from ctxprop._transport import OK, SendOutcome

if TYPE_CHECKING:
    from opentelemetry.context import Context

__all__ = ["CtxpropSpanProcessor"]

Sender = Callable[[bytes, float], SendOutcome]


# The context key OpenTelemetry's instrumentations check before tracing a call, set around every export so
# the exporter's own HTTP request is not traced. The API has no public name for it (create_key() makes a
# unique key each call), so this is the one private name used, with the instrumentations' own fallback;
# tests/test_processor.py checks that exports run suppressed.
_SUPPRESS_KEY: str = getattr(otel_context, "_SUPPRESS_INSTRUMENTATION_KEY", "suppress_instrumentation")

_REPLAY_SLICE = 1.0
# After a replay the collector refused, probe it again after this long, doubling up to the cap.
_REPLAY_BACKOFF_START = 2.0
_REPLAY_BACKOFF_CAP = 60.0
# How long a fork waits for an idle export thread to leave.
_PARK_WAIT = 1.0
# A request still in flight after a flush of at least this budget is not waited for again by close().
_STALL_BUDGET = 1.0


class CtxpropSpanProcessor(SpanProcessor, Ledger):
    """Batches ended spans and exports them from one background thread; a drop-in ``BatchSpanProcessor``.

    The constructor is the SDK's: ``span_exporter`` (any OTel ``SpanExporter``), ``max_queue_size``,
    ``schedule_delay_millis``, ``max_export_batch_size``, ``export_timeout_millis``, validated the same way
    and read from ``OTEL_BSP_*`` when not given. A failing export is retried a bounded number of times
    within the export timeout, then dropped and counted; ``force_flush()`` and ``shutdown()`` return by
    their deadline even if ``export()`` blocks. ``init()`` builds one for its own OTLP path (``sender=``,
    with a spool); build one yourself only for a provider you manage by hand.

    ``tag_scopes=True`` makes it also copy the active scopes' tags onto each span as it starts (what
    :class:`ScopeTagSpanProcessor` does), so one processor does both: the provider calls every processor
    three times per span, and ``init()`` builds it so.

    >>> from opentelemetry.sdk.trace import TracerProvider
    >>> from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    >>> provider = TracerProvider()
    >>> provider.add_span_processor(CtxpropSpanProcessor(InMemorySpanExporter(), max_export_batch_size=100))

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        span_exporter: SpanExporter | None = None,
        max_queue_size: int | None = None,
        schedule_delay_millis: float | None = None,
        max_export_batch_size: int | None = None,
        export_timeout_millis: float | None = None,
        *,
        exporter: SpanExporter | None = None,
        sender: Sender | None = None,
        spool: Any = None,
        schedule_delay: float | None = None,
        export_timeout: float | None = None,
        durable: bool = False,
        give_up_after: float | None = None,
        tag_scopes: bool = False,
    ) -> None:
        if span_exporter is not None and exporter is not None and span_exporter is not exporter:
            raise ValueError("CtxpropSpanProcessor needs exactly one of span_exporter (exporter=) or sender=")
        exporter = exporter if exporter is not None else span_exporter
        if (exporter is None) == (sender is None):
            raise ValueError("CtxpropSpanProcessor needs exactly one of span_exporter (exporter=) or sender=")
        queue, delay_ms, batch, timeout_ms = settings(
            max_queue_size,
            schedule_delay_millis if schedule_delay is None else schedule_delay * 1000.0,
            max_export_batch_size,
            export_timeout_millis if export_timeout is None else export_timeout * 1000.0,
        )
        self._exporter = exporter
        self._sender = sender
        self._tag_scopes = tag_scopes
        # ctxprop's OTLP path queues snapshots (taken by the thread that ended the span, written a batch
        # at once by the export thread: see _encoding.record); a custom exporter is given the spans.
        self._record: Callable[[ReadableSpan], Queued | None] | None = None
        if sender is not None:
            _encoding.prepare()
            self._record = _encoding.record
        self._spool = spool if sender is not None else None
        self._durable = durable and self._spool is not None
        self._max_queue = int(queue)
        self._limit = int(queue)  # 0 once shut down: on_end then drops through its one length check
        self._batch_size = int(batch)
        self._schedule_delay = delay_ms / 1000.0
        self._export_timeout = timeout_ms / 1000.0
        self._policy = Policy(give_up_after=self._export_timeout if give_up_after is None else give_up_after)
        # Counting never takes a lock: on_end's drop path runs on application threads (often the main
        # thread), and a SIGTERM handler running close() on top of it must never wait for a lock that
        # interrupted frame holds. Increments go to a deque and are folded by whoever reads them.
        self._tally: deque[tuple[str, int]] = deque()
        self._totals: dict[str, int] = {}
        self._fold_lock = threading.Lock()
        self._exporter_shut = False
        self._shut = False
        self._last_error = ""
        self._logged_error = False
        self._init_runtime_state()
        _stats.register_source(self._books_live)
        if hasattr(os, "register_at_fork"):
            weak = weakref.WeakMethod(self._after_fork_in_child)
            weak_before = weakref.WeakMethod(self._before_fork)
            weak_parent = weakref.WeakMethod(self._after_fork_in_parent)

            def _after_in_child() -> None:
                method = weak()
                if method is not None:
                    method()

            def _before() -> None:
                method = weak_before()
                if method is not None:
                    method()

            def _after_in_parent() -> None:
                method = weak_parent()
                if method is not None:
                    method()

            os.register_at_fork(
                before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child
            )

    def _init_runtime_state(self) -> None:
        self._queue: deque[Queued] = deque()
        # RLock: a signal handler's close() may run on a thread that is inside one of these sections.
        self._lock = threading.RLock()
        self._waiting: list[Batch] = []  # batches owned by the processor between attempts, oldest first
        self._inflight: Batch | None = None
        self._memory_spans = 0  # spans in batches the books count as in memory
        self._undelivered = 0  # batches spooled or dropped so far: a flush that saw one did not deliver all
        self._taken = 0  # spans taken out of the queue so far
        self._flush_seq = 0  # a flush waits until every span before this position is settled
        self._flush_deadline: float | None = None
        self._last_cut = time.monotonic()
        # A wake-up is one C call (release of a lock the thread waits on): safe from signal handlers and
        # without the GIL. Waiters of flush() each wait on a lock of their own the same way.
        self._wake = _thread.allocate_lock()
        self._wake.acquire()
        self._waiters: list[Any] = []
        self._start_lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._running = False
        self._driver: int | None = None  # the thread exporting right now (the worker, or inline)
        self._gen = getattr(self, "_gen", 0) + 1
        self._park = False
        self._forking = False  # between the before-fork hook and the fork: the export thread stays out
        self._stopping = False
        self._start_retry_at = 0.0
        self._down = False
        self._replay_lock = threading.Lock()
        self._want_replay = False
        self._replay_at = 0.0
        self._replay_backoff = 0.0
        self._pid = os.getpid()

    # -- fork ------------------------------------------------------------------------------------------
    def _before_fork(self) -> None:
        # The export thread leaves before the fork (once its request in flight, if any, is answered, for
        # at most _PARK_WAIT), so the parent forks single-threaded; the parent restarts it after the fork
        # if spans are still queued. The child drops what the parent queued: the parent sends those.
        thread = self._thread
        if thread is None or thread is threading.current_thread() or self._pid != os.getpid():
            return
        self._forking = True
        self._poke()
        thread.join(_PARK_WAIT)

    def _after_fork_in_parent(self) -> None:
        if not self._forking:
            return
        self._forking = False
        with self._lock:
            idle = self._idle()
        if not idle and not self._stopping:
            self._start_worker()

    def _park_if_idle(self, deadline: float) -> None:
        """Let an idle export thread leave now and wait for it (by ``deadline``): after a flush or before
        a fork no thread of ours is alive. The next span starts one again."""
        thread = self._thread
        if thread is None or thread is threading.current_thread() or self._pid != os.getpid():
            return
        with self._lock:
            if not self._idle():
                return
            self._park = True
        self._poke()
        thread.join(max(0.0, deadline - time.monotonic()))

    def _after_fork_in_child(self) -> None:
        # The child neither exports the parent's spans nor uses its locks or thread; the parent sends them.
        inherited = self._memory_spans
        old_wake, old_thread = self._wake, self._thread
        self._init_runtime_state()
        if old_thread is not None and old_thread.is_alive():
            # Only where the pid check fired with no real fork (a real child has no such thread): the old
            # thread wakes, sees its generation is over and leaves, instead of lingering for a delay.
            with contextlib.suppress(RuntimeError):
                old_wake.release()
        self._fold_lock = threading.Lock()
        if inherited:
            self._count("spans_ended", -inherited)  # the parent's, not the child's: keep the books balanced
        reset = getattr(self._sender, "reset_after_fork", None)
        if reset is not None:
            reset()

    def _check_pid(self) -> None:
        # Backup for the at-fork hook (a fork that bypassed it, e.g. through a C extension): a child must
        # never export what its parent queued.
        if self._pid != os.getpid():
            self._after_fork_in_child()

    # -- the application thread ------------------------------------------------------------------------
    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        # The scope tags, when this processor was made with tag_scopes=True (init() makes it so): one
        # processor instead of two saves the provider three Python-level calls per span. The emptiness
        # test is active_tags()'s, inline: most spans start with no tags, and then nothing is called.
        if self._tag_scopes and (ISOLATION.get()._tags or CURRENT.get()._tags):
            tag_span(span)

    def on_end(self, span: ReadableSpan) -> None:
        record = self._record
        if record is None:
            if not span.context.trace_flags.sampled:
                return
            item: Queued = span
        else:
            queued = record(span)  # None: not sampled
            if queued is None:
                return
            item = queued
        q = self._queue
        if len(q) >= self._limit:
            self._drop_on_end()
            return
        q.append(item)
        if not self._running:
            self._start_worker()
        elif len(q) >= self._batch_size:
            self._poke()

    def _drop_on_end(self) -> None:
        self._count("dropped_after_shutdown" if self._shut else "dropped_queue_full", 1)
        self._count("spans_ended", 1)

    def _poke(self) -> None:
        if self._wake.locked():
            with contextlib.suppress(RuntimeError):  # woken by another thread in between
                self._wake.release()

    # -- the export thread's lifecycle -----------------------------------------------------------------
    def _start_worker(self) -> bool:
        """Make sure the export thread runs; False when no thread can start now."""
        self._check_pid()
        with self._start_lock:
            if self._running:
                self._poke()
                return True
            if self._stopping or self._forking or time.monotonic() < self._start_retry_at:
                return False
            self._running = True
            self._park = False
            t = threading.Thread(target=self._run, args=(self._gen,), name="ctxprop-exporter", daemon=True)
            try:
                t.start()
            except RuntimeError:
                # No new thread now: interpreter shutdown (3.12.0-3.12.2 refuse threads in atexit handlers,
                # python/cpython#113964; later finalization refuses them everywhere) or a
                # thread limit. flush()/close() then export in the calling thread; a later span retries.
                self._running = False
                self._start_retry_at = time.monotonic() + 1.0
                self._count("worker_start_errors", 1)
                return False
            self._thread = t
            return True

    def _idle(self) -> bool:
        """Nothing queued, waiting, in flight or to replay (caller holds the lock)."""
        return not self._queue and not self._waiting and self._inflight is None and not self._want_replay

    def _leave(self, gen: int) -> bool:
        """The export thread may leave: stopping, parked, or idle for a schedule delay."""
        with self._start_lock:
            if gen != self._gen:
                return True
            with self._lock:
                if not self._stopping and not self._forking and not self._idle():
                    return False
            self._running = False
            self._thread = None
            return True

    def _run(self, gen: int) -> None:
        # A partial batch waits a whole schedule delay from when the thread runs, as from a cut.
        self._last_cut = time.monotonic()
        token = attach(set_value(_SUPPRESS_KEY, True))
        try:
            idle_since: float | None = None
            while True:
                if gen != self._gen or self._stopping or self._forking:
                    self._leave(gen)
                    return
                job, wait = self._next_job()
                if job is not None:
                    idle_since = None
                    self._drive_one(job)
                    continue
                now = time.monotonic()
                with self._lock:
                    idle = self._idle()
                if idle:
                    idle_since = idle_since if idle_since is not None else now
                    if (self._park or now - idle_since >= self._schedule_delay) and self._leave(gen):
                        return
                    wait = min(wait, max(0.0, idle_since + self._schedule_delay - now))
                self._wake.acquire(timeout=min(max(0.0, wait), 3600.0))
        except Exception:  # noqa: BLE001 - the export thread must survive any fault, then leave cleanly
            self._count("export_errors", 1)
            self._leave(gen)
        finally:
            detach(token)
            self._notify()

    # -- choosing the next job (under the lock) --------------------------------------------------------
    def _next_job(self) -> tuple[Any, float]:
        """(job, 0) to do now, or (None, seconds until something is due)."""
        with self._lock:
            now = time.monotonic()
            wait = self._schedule_delay
            for batch in self._waiting:
                if batch.not_before <= now:
                    self._waiting.remove(batch)
                    batch.state = SENDING
                    self._inflight = batch
                    return batch, 0.0
                wait = min(wait, batch.not_before - now)
            q = self._queue
            if q:
                flushing = self._taken < self._flush_seq
                due = self._last_cut + self._schedule_delay
                if len(q) >= self._batch_size or flushing or now >= due or self._stopping:
                    return self._cut(now, flushing), 0.0
                wait = min(wait, due - now)
            if self._want_replay and self._spool is not None:
                if now >= self._replay_at:
                    self._want_replay = False
                    return "replay", 0.0
                wait = min(wait, self._replay_at - now)
            return None, max(0.0, wait)

    def _cut(self, now: float, flushing: bool) -> Batch:
        q = self._queue
        spans: list[Queued] = []
        for _ in range(min(self._batch_size, len(q))):
            spans.append(q.popleft())
        batch = Batch(spans, self._taken)
        self._taken += len(spans)
        self._memory_spans += len(spans)
        self._last_cut = now
        if flushing and self._flush_deadline is not None and self._spool is not None:
            # Cut for a flush: its request ends by the flush's deadline, and the batch then goes to the
            # spool, where a request the worker started on its own keeps its whole export timeout.
            batch.deadline = self._flush_deadline
        self._inflight = batch
        self._count("spans_ended", len(spans))
        return batch

    # -- one attempt ------------------------------------------------------------------------------------
    def _drive_one(self, job: Any) -> None:
        self._driver = threading.get_ident()
        try:
            if job == "replay":
                self._background_replay()
            else:
                self._attempt(job)
        finally:
            self._driver = None
            self._notify()

    def _attempt(self, batch: Batch) -> None:
        if self._sender is not None and batch.payload is None:
            if not self._encode(batch):
                return
            if self._durable and batch.handle is None:
                batch.handle = self._spool_call("write_ahead", batch.payload, batch.count)
        timeout = self._export_timeout
        if batch.deadline is not None:
            timeout = min(timeout, batch.deadline - time.monotonic())
        out = self._send(batch, timeout)
        now = time.monotonic()
        if out.ok or out.permanent:
            self._settle_answered(batch, out)
            return
        batch.attempts += 1
        if batch.attempts == 1:
            batch.first_failure = now
        self._count("retried", batch.count)
        if out.status is None and self._spool is not None:
            self._down = self._down or batch.attempts >= 2
        verdict = self._policy.after_failure(
            attempts=batch.attempts, age=now - batch.first_failure, retry_after=out.retry_after
        )
        flush_deadline = batch.deadline if batch.deadline is not None else self._flush_deadline
        at_deadline = flush_deadline is not None and now + verdict.wait >= flush_deadline
        if self._spool is not None and (verdict.give_up or self._down or at_deadline or self._stopping):
            self._to_spool(batch, "gave_up")
        elif verdict.give_up:
            self._drop(batch, f"dropped_export_{verdict.reason or 'failed'}")
        else:
            with self._lock:
                if batch.state is SENDING:
                    batch.state = WAITING
                    batch.not_before = now + verdict.wait
                    batch.deadline = None
                    self._inflight = None
                    self._waiting.append(batch)
                    self._waiting.sort(key=lambda b: b.seq)
                    self._enforce_memory_bound()

    def _encode(self, batch: Batch) -> bool:
        """Encode once; a span that cannot be encoded is dropped alone, the rest of its batch goes on."""
        try:
            payload, count, dropped = encode(batch.spans or [])
        except Exception:  # noqa: BLE001 - an unencodable batch is counted, never raised
            self._drop(batch, "dropped_unencodable")
            return False
        if dropped:
            with self._lock:
                if batch.on_books == "memory":
                    self._memory_spans -= dropped
                batch.count = count
            self._count("dropped_unencodable", dropped)
        batch.payload = payload
        batch.spans = None
        if not count:
            with self._lock:
                self._release(batch)
            return False
        return True

    def _send(self, batch: Batch, timeout: float) -> SendOutcome:
        if self._sender is not None:
            if timeout <= 0:
                return SendOutcome(False, retryable=True)
            return self._sender(batch.payload or b"", timeout)
        assert self._exporter is not None  # noqa: S101 - one of the two is set by __init__
        # A processor with an exporter queues the spans themselves, never records.
        spans = cast("list[ReadableSpan]", batch.spans or [])
        try:
            result = self._exporter.export(spans)
        except Exception:  # noqa: BLE001 - a custom exporter's fault is a failed attempt
            return SendOutcome(False, retryable=True)
        return OK if result is SpanExportResult.SUCCESS else SendOutcome(False, retryable=True)

    @property
    def queue_length(self) -> int:
        """Spans waiting in the queue (not yet batched)."""
        return len(self._queue)

    @property
    def pending_spans(self) -> int:
        """Spans in batches that failed and wait for a retry."""
        with self._lock:
            return sum(b.count for b in self._waiting)

    @property
    def span_exporter(self) -> SpanExporter | None:
        """The exporter given to the constructor (None on ctxprop's own OTLP path)."""
        return self._exporter

    # -- the spool -------------------------------------------------------------------------------------
    def _background_replay(self) -> None:
        if self._spool is None or self._sender is None:
            return
        if not self._replay_lock.acquire(blocking=False):
            return
        try:
            if not self._spool.has_pending():
                self._replay_backoff = 0.0
                return
            # The slice bounds when requests start, never how long one may take: a request cut short
            # after the collector kept it would be sent again (the spool's replay() explains the edges).
            sent = self._spool.replay(
                self._sender, time.monotonic() + _REPLAY_SLICE, timeout=self._export_timeout
            )
            self._count("replayed", sent)
            if not self._spool.has_pending() or self._stopping:
                self._replay_backoff = 0.0
            elif sent > 0:
                self._want_replay = True  # progress: go on with the next slice at once
                self._replay_at = 0.0
            else:
                # The collector refused the replay: probe again later, backing off, not in a hot loop.
                # A successful export re-arms the replay sooner.
                self._replay_backoff = min(
                    _REPLAY_BACKOFF_CAP, max(_REPLAY_BACKOFF_START, self._replay_backoff * 2)
                )
                self._replay_at = time.monotonic() + self._replay_backoff
                self._want_replay = True
        except Exception:  # noqa: BLE001 - a spool fault must not stop exporting
            self._count("spool_errors", 1)
        finally:
            self._replay_lock.release()

    def request_replay(self) -> None:
        """Ask the export thread to send what the spool holds (after ``init()``, or when the collector is
        back). Starts no thread when the spool is empty."""
        if self._spool is None or not self._spool_call("has_pending"):
            return
        self._want_replay = True
        self._replay_at = 0.0
        self._start_worker()
        self._poke()

    def replay_until(self, deadline: float) -> int:
        """Send spooled payloads until ``deadline``; returns spans delivered."""
        if self._spool is None or self._sender is None:
            return 0
        if not self._replay_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return 0
        try:
            if time.monotonic() >= deadline or not self._spool_call("has_pending"):
                return 0
            token = attach(set_value(_SUPPRESS_KEY, True))
            try:
                sent = self._spool_call("replay", self._sender, deadline) or 0
            finally:
                detach(token)
        finally:
            self._replay_lock.release()
        self._count("replayed", int(sent))
        return int(sent)

    # -- flush / shutdown ------------------------------------------------------------------------------
    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            with contextlib.suppress(RuntimeError):
                w.release()

    def _flushed(self, target: int) -> bool:
        """Every span that left the queue before ``target`` is settled (caller holds the lock)."""
        if self._taken < target:
            return False
        inflight = self._inflight
        if inflight is not None and inflight.seq < target:
            return False
        return not any(b.seq < target for b in self._waiting)

    def flush_until(self, deadline: float, *, closing: bool = False) -> bool:
        """Export everything ended so far by ``deadline`` (``time.monotonic()``); True when all of it was
        delivered. What is undelivered at the deadline goes to the spool (OTLP path). Never raises."""
        try:
            return self._flush(deadline, closing)
        except Exception:  # noqa: BLE001 - flush is called from atexit and signal handlers: never raise
            self._count("export_errors", 1)
            return False

    def _flush(self, deadline: float, closing: bool) -> bool:
        self._check_pid()
        if self._driver == threading.get_ident():
            # A signal handler interrupted this very thread while it exported inline: waiting for itself
            # would wait out the deadline. Spool what is left if closing; the interrupted export resumes.
            if closing:
                self._leftovers(closing=True)
            return False
        total = max(0.0, deadline - time.monotonic())
        work_deadline = deadline - reserve_for_spool(total) if self._spool is not None else deadline
        with self._lock:
            target = self._taken + len(self._queue)
            undelivered = self._undelivered
            self._flush_seq = max(self._flush_seq, target)
            self._flush_deadline = work_deadline
            already = self._flushed(target)
            inflight = self._inflight
            # One deadline, not two: a request that already outlived a whole flush (a SIGTERM handler's,
            # say) is not waited for again when the pipeline shuts down; it is copied to the spool at once.
            stalled = self._shut and inflight is not None and inflight.stalled
        if already:
            self._flush_deadline = None
            self._park_if_idle(deadline)
            return True
        try:
            if not stalled:
                if not self._start_worker():
                    self._drive_inline(target, work_deadline)
                self._wait(target, deadline if self._spool is not None else work_deadline)
            with self._lock:
                flushed = self._flushed(target)
                delivered = self._undelivered == undelivered
            if flushed:
                self._park_if_idle(deadline)
                return delivered
            with self._lock:
                inflight = self._inflight
                if inflight is not None and total >= _STALL_BUDGET:
                    inflight.stalled = True
            self._leftovers(closing=closing)
            return False
        finally:
            with self._lock:
                if self._flush_deadline == work_deadline:
                    self._flush_deadline = None

    def _wait(self, target: int, deadline: float) -> None:
        while True:
            w = _thread.allocate_lock()
            w.acquire()
            with self._lock:
                if self._flushed(target):
                    return
                self._waiters.append(w)
            if not self._running and self._driver is None:
                return  # nobody is exporting (the thread could not start or left): do not wait in vain
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            w.acquire(timeout=remaining)

    def _drive_inline(self, target: int, deadline: float) -> None:
        """No export thread can start (interpreter shutdown): export in the calling thread."""
        token = attach(set_value(_SUPPRESS_KEY, True))
        try:
            while time.monotonic() < deadline:
                with self._lock:
                    if self._flushed(target) or self._driver is not None:
                        return
                job, wait = self._next_job()
                if job is None:
                    if wait > 0 and time.monotonic() + wait < deadline:
                        threading.Event().wait(wait)  # a retry's backoff, bounded by the deadline
                        continue
                    return
                if job == "replay":
                    continue
                self._drive_one(job)
        finally:
            detach(token)

    def shutdown_until(self, deadline: float) -> bool:
        """Flush, replay the spool in what remains, then stop the export thread and shut the exporter
        down. Idempotent; never raises."""
        if self._shut:
            return True
        self._shut = True
        ok = self.flush_until(deadline)
        self._limit = 0
        if ok and not self._down:
            self.replay_until(deadline)
        if not ok or self._queue or self._inflight is not None or self._waiting:
            # Spans that ended meanwhile, and what is still in flight or waiting, against the same deadline.
            ok = self.flush_until(deadline, closing=True) and ok
        self._stopping = True
        self._poke()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, min(0.2, deadline - time.monotonic())))
        self._shutdown_exporter()
        if self._spool is not None and (thread is None or not thread.is_alive()):
            # Nothing writes to the spool any more: what only its memory holds dies with the process, and
            # close() counts it as dropped (the books balance). (Not while a request still runs: its
            # late answer must still be able to remove the spool's copy of its batch.)
            self._spool_call("close")
        return ok

    def _shutdown_exporter(self) -> None:
        if self._exporter_shut:
            return
        self._exporter_shut = True
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
        with self._lock:
            self._queue.clear()
            self._waiting.clear()
            self._memory_spans = 0
        self._stopping = True
        self._poke()
        close = getattr(self._sender, "close", None)
        if close is not None:
            close()

    # -- SpanProcessor API -----------------------------------------------------------------------------
    def shutdown(self) -> None:
        """``TracerProvider.shutdown()`` hook: like ``close()``, within the export timeout (at most 30 s)."""
        self.shutdown_until(time.monotonic() + min(30.0, max(3.0, self._export_timeout)))

    def force_flush(self, timeout_millis: int | None = 30000) -> bool:
        """``TracerProvider.force_flush()`` hook; False after ``shutdown()`` or when not all was sent."""
        if self._shut:
            return False
        millis = 30000 if timeout_millis is None else timeout_millis
        return self.flush_until(time.monotonic() + millis / 1000)

    def export_now(self, spans: Sequence[ReadableSpan]) -> None:
        """Queue already-ended spans (e.g. received from a worker process) as if they had just ended."""
        for s in spans:
            self.on_end(s)
