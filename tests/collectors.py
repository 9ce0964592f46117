"""Loopback collectors that misbehave in one precise way, for the pipeline's and the spool's tests.

Each is a real HTTP server on 127.0.0.1 (the receiver of ``ctxprop._devtools.receiver`` where it can
play the part), started by a context manager that stops it.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from ctxprop._devtools.receiver import OTLPReceiver, ReceivedSpan

__all__ = ["duplicates", "late_answering_receiver"]


@contextmanager
def late_answering_receiver(low: float, high: float, *, seed: int = 0) -> Iterator[OTLPReceiver]:
    """A collector that keeps each request at once, then answers 200 only ``low``..``high`` s later.

    The worst case for a client: a request it gives up on has already been kept, so resending it is a
    duplicate.
    """
    rng = random.Random(seed)  # noqa: S311 - delays for a test collector, not secrets
    lock = threading.Lock()
    stop = threading.Event()

    def answer_late(_spans: list[ReceivedSpan]) -> None:
        with lock:
            delay = rng.uniform(low, high)
        stop.wait(delay)

    rx = OTLPReceiver(on_spans=answer_late).start()
    try:
        yield rx
    finally:
        stop.set()
        rx.stop()


def duplicates(rx: OTLPReceiver) -> int:
    """How many spans ``rx`` received more than once (each extra copy counts), by span id."""
    counts = Counter((s.trace_id, s.span_id) for s in rx.spans)
    return sum(n - 1 for n in counts.values())
