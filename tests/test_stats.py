"""ctxprop's process-wide counters."""

from __future__ import annotations

import threading

from ctxprop import _stats


def test_counts_add_up_across_threads() -> None:
    """Increments from many threads at once are all counted, past the fold threshold too."""
    def work() -> None:
        for _ in range(5000):
            _stats.incr("hits")
        _stats.incr("big", 7)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = _stats.snapshot()
    assert counts["hits"] == 40000
    assert counts["big"] == 56


def test_incr_never_waits_for_the_fold_lock() -> None:
    """incr() returns while another holder has the lock, as a SIGTERM handler that interrupted a reader on
    the same thread must (a blocking incr there would deadlock the process)."""
    done = threading.Event()

    def count() -> None:
        for _ in range(2 * _stats._FOLD_AT):
            _stats.incr("during_hold")
        done.set()

    with _stats._lock:
        threading.Thread(target=count, daemon=True).start()
        assert done.wait(10), "incr() blocked on the lock"
    assert _stats.snapshot()["during_hold"] == 2 * _stats._FOLD_AT


def test_reset_zeroes_everything() -> None:
    """reset() drops folded totals and pending increments alike."""
    _stats.incr("a")
    _stats.snapshot()
    _stats.incr("b")
    _stats.reset()
    assert _stats.snapshot() == {}
