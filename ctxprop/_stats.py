"""Process-wide counters of what ctxprop skipped, dropped, retried or delivered.

Every component counts here through :func:`incr`; :func:`ctxprop.stats` returns a snapshot. Counting
takes a lock only for the increment itself, and the paths that count are the rare ones (a drop, a bad
tag, a retry) or per batch, never per span on the application thread.
"""

from __future__ import annotations

import os
import threading
from collections import Counter

__all__ = ["incr", "reset", "snapshot"]

_lock = threading.Lock()
_counts: Counter[str] = Counter()


def incr(name: str, n: int = 1) -> None:
    """Add ``n`` to counter ``name``."""
    with _lock:
        _counts[name] += n


def snapshot() -> dict[str, int]:
    """A copy of every counter.

    .. versionadded:: 0.1.0
    """
    with _lock:
        return dict(_counts)


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the lock at fork(); the child has no such thread.
    global _lock  # noqa: PLW0603
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def reset() -> None:
    """Zero every counter (tests, and a forked child that starts its own accounting)."""
    with _lock:
        _counts.clear()
