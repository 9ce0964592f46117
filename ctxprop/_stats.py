"""Process-wide counters of what ctxprop skipped, dropped, retried or delivered.

Every component counts here through :func:`incr`; :func:`ctxprop.stats` returns a snapshot.

:func:`incr` never blocks: it appends to a deque (atomic under the GIL) that readers fold into the totals.
A lock there would deadlock when a signal handler (ctxprop's SIGTERM close counts what it spools) runs on
the main thread while that thread is inside ``incr`` holding it.
"""

from __future__ import annotations

import os
import threading
from collections import Counter, deque

__all__ = ["incr", "reset", "snapshot"]

_FOLD_AT = 4096  # pending increments past which a writer folds them (if nobody else is folding)

_lock = threading.Lock()  # serialises folding only; incr() never waits for it
_pending: deque[tuple[str, int]] = deque()
_counts: Counter[str] = Counter()


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


def snapshot() -> dict[str, int]:
    """A copy of every counter.

    >>> import ctxprop
    >>> isinstance(ctxprop.stats(), dict)
    True

    .. versionadded:: 0.1.0
    """
    with _lock:
        _fold()
        return dict(_counts)


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
