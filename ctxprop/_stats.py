"""Process-wide counters of what ctxprop skipped, dropped, retried or delivered.

Every component counts here through :func:`incr`; :func:`ctxprop.stats` returns a snapshot.

:func:`incr` never blocks: it appends to a deque (atomic under the GIL) that readers fold into the totals.
A lock there would deadlock when a signal handler (ctxprop's SIGTERM close counts what it spools) runs on
the main thread while that thread is inside ``incr`` holding it.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import Counter, deque
from collections.abc import Callable

__all__ = ["BOOKS", "incr", "register_source", "reset", "snapshot"]

#: The keys that balance: ``spans_ended == spans_exported + spans_rejected + spans_dropped + spans_pending``.
BOOKS = ("spans_ended", "spans_exported", "spans_rejected", "spans_dropped", "spans_pending")

_FOLD_AT = 4096  # pending increments past which a writer folds them (if nobody else is folding)

_lock = threading.Lock()  # serialises folding only; incr() never waits for it
_pending: deque[tuple[str, int]] = deque()
_counts: Counter[str] = Counter()
# Live parts of the books, read at snapshot time: each processor's (spans queued, spans in memory batches).
_sources: list[weakref.WeakMethod[Callable[[], tuple[int, int]]]] = []


def incr(name: str, n: int = 1) -> None:
    """Add ``n`` to counter ``name``; never blocks, never raises."""
    _pending.append((name, n))
    if len(_pending) > _FOLD_AT and _lock.acquire(blocking=False):
        try:
            _fold()
        finally:
            _lock.release()


def _fold() -> None:
    # Caller holds _lock. popleft() is atomic, so appends racing with the fold are never lost.
    while _pending:
        name, n = _pending.popleft()
        _counts[name] += n


def register_source(live: Callable[[], tuple[int, int]]) -> None:
    """Add a processor's live books (a bound method returning spans queued and spans held in memory
    batches) to every :func:`snapshot`; held weakly."""
    _sources[:] = [ref for ref in _sources if ref() is not None]
    _sources.append(weakref.WeakMethod(live))


def _books(counts: dict[str, int]) -> None:
    queued = held = 0
    for ref in list(_sources):
        live = ref()
        if live is None:
            continue
        try:
            q, h = live()
        except Exception:  # noqa: BLE001, S112 - a processor mid-teardown adds nothing
            continue
        queued += q
        held += h
    # A memory-only spool (no writable disk) loses what it holds when it closes: spans this process gave it.
    lost_in_spool = counts.get("spool_dropped_memory_spans", 0)
    books = {
        "spans_ended": counts.get("spans_ended", 0) + queued,
        "spans_exported": counts.get("spans_exported", 0),
        "spans_rejected": counts.get("spans_rejected", 0),
        "spans_dropped": sum(v for k, v in counts.items() if k.startswith("dropped_")) + lost_in_spool,
        "spans_pending": queued + held + counts.get("spans_spooled", 0) - lost_in_spool,
    }
    if any(books.values()):
        counts.update(books)


def snapshot() -> dict[str, int]:
    """A copy of every counter.

    The books balance after ``close()``: ``spans_ended`` = ``spans_exported`` + ``spans_rejected`` +
    ``spans_dropped`` (the sum of the ``dropped_*`` keys and ``spool_dropped_memory_spans``) +
    ``spans_pending`` (queued, in flight, or handed to the spool). These five keys appear once any span ended.

    >>> import ctxprop
    >>> isinstance(ctxprop.stats(), dict)
    True

    .. versionadded:: 0.1.0
    """
    with _lock:
        _fold()
        counts = dict(_counts)
    _books(counts)
    return counts


def reset() -> None:
    """Zero every counter (tests, and a forked child that starts its own accounting)."""
    with _lock:
        _pending.clear()
        _counts.clear()


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the lock at fork(); the child has no such thread.
    global _lock  # noqa: PLW0603
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
