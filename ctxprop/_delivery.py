"""The delivery policy: what happens to a batch after each attempt to send it.

Pure decisions, no I/O and no threads, so every rule can be read (and tested) in one place:

- success: the batch is settled (spans in a ``partial_success`` answer's ``rejected_spans`` are counted
  as rejected, the rest as exported);
- a permanent refusal (HTTP 4xx other than 408/429): settled as rejected, retrying cannot help;
- a retryable failure: retried after capped, jittered exponential backoff, or after the collector's
  ``Retry-After``; a bounded number of times, and only while the batch is younger than the give-up time
  (the export timeout). Then it is given up: to the spool when there is one, else dropped and counted;
- a collector that does not answer at all (refused, reset, timed out) twice in a row is "down": with a
  spool, batches go straight to it until an export succeeds again, instead of waiting out their retries.

>>> policy = Policy(give_up_after=10.0)
>>> policy.after_failure(attempts=1, age=0.0, retry_after=None).give_up
False
>>> policy.after_failure(attempts=policy.max_attempts, age=0.0, retry_after=None).give_up
True
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Policy", "Verdict", "backoff"]

BACKOFF_BASE = 0.1
BACKOFF_CAP = 5.0
# A Retry-After longer than this is treated as "collector away": the batch is given up, not held.
RETRY_AFTER_CAP = 30.0
# Attempts per batch before it is given up (1 + 5 retries: about 3 s of backoff at the base rate).
MAX_ATTEMPTS = 6


def backoff(attempts: int) -> float:
    """Seconds before retry number ``attempts`` (1-based): doubling from 0.1 s up to 5 s, +-20 % jitter."""
    base: float = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** max(0, attempts - 1))
    return base * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not cryptography


@dataclass(frozen=True)
class Verdict:
    """After a failed attempt: give the batch up now, or wait ``wait`` seconds and try again."""

    give_up: bool
    wait: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class Policy:
    """Retry and give-up rules for one processor.

    ``give_up_after``: seconds from a batch's first failure after which it is given up (the export
    timeout); ``max_attempts``: attempts per batch.
    """

    give_up_after: float
    max_attempts: int = MAX_ATTEMPTS
    retry_after_cap: float = RETRY_AFTER_CAP

    def after_failure(self, *, attempts: int, age: float, retry_after: float | None) -> Verdict:
        """The verdict after ``attempts`` failed attempts, the first ``age`` seconds ago."""
        if attempts >= self.max_attempts:
            return Verdict(True, reason="attempts")
        if retry_after is not None and retry_after > self.retry_after_cap:
            return Verdict(True, reason="retry_after")
        wait = retry_after if retry_after is not None else backoff(attempts)
        if age + wait > self.give_up_after:
            return Verdict(True, reason="timeout")
        return Verdict(False, wait=max(0.0, wait))


def reserve_for_spool(total: float) -> float:
    """Of a ``total``-second deadline, the slice kept to write leftovers to the spool: 10 %, at most 0.3 s.

    >>> reserve_for_spool(3.0)
    0.3
    >>> reserve_for_spool(1.0)
    0.1
    """
    return min(0.3, max(0.0, total) * 0.1)
