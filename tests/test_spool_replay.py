"""Background replay of the spool through collectors that answer late: every span once, none twice."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from collectors import duplicates, late_answering_receiver
from support import assert_books_balance, run_child
from test_spool_processes import fill_spool

from ctxprop._spool import Spool

SPANS = 3000

# A fresh process replays what an earlier one spooled, in the background (no flush, no close deadline),
# and closes once the spool reports every span delivered.
REPLAYER = """
import json, time
import ctxprop
from ctxprop import _stats
ctxprop.init(service_name="replayer", endpoint={endpoint!r}, spool_dir={spool_dir!r})
end = time.monotonic() + 60
while _stats.snapshot().get("spool_replayed_spans", 0) < {spans} and time.monotonic() < end:
    time.sleep(0.05)
ctxprop.close()
print(json.dumps({{"stats": ctxprop.stats()}}))
"""


def replay_through_late_collector(
    spool_dir: Path, low: float, high: float, seed: int
) -> tuple[int, int, dict[str, int]]:
    """(spans received, duplicates among them, the replayer's stats) for one background replay."""
    with late_answering_receiver(low, high, seed=seed) as rx:
        result = run_child(
            REPLAYER.format(endpoint=rx.endpoint, spool_dir=str(spool_dir), spans=SPANS), timeout=90
        )
        assert result.returncode == 0, result.stderr
        return rx.span_count, duplicates(rx), result.last("stats")


#: (spans received, duplicates among them, the replayer's stats, spans left in the spool) of one run.
Run = tuple[int, int, dict[str, int], int]

# The late bands the parametrized test covers: (low s, high s, batches of the 3000 spans), seed 1.
BANDS = {"300-600ms": (0.3, 0.6, 10), "0.7-1.3s": (0.7, 1.3, 4)}


def background_run(filled: Path, spool_dir: Path, low: float, high: float, seed: int) -> Run:
    """A copy of ``filled`` (3000 spans spooled by another process) replayed in the background."""
    shutil.copytree(filled, spool_dir)
    received, dups, stats = replay_through_late_collector(spool_dir, low, high, seed=seed)
    return received, dups, stats, Spool.open(spool_dir).status().spans


@pytest.fixture(scope="module")
def background_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future[Run]]]:
    """Every background replay this module checks, started together: the two bands (seed 1) and the ten
    50-300 ms runs (seeds 0-9). Each run has its own spool, seeded late collector and replaying process;
    side by side, the module waits on the collectors' late answers once instead of twelve times in a
    row, and each run's slice boundaries fall under its neighbours' jitter (harder on timing, not
    easier). The results are read-only; each test checks its own runs."""
    root = tmp_path_factory.mktemp("replays")
    jobs = {name: (*band, 1) for name, band in BANDS.items()}
    jobs.update({f"ten-{seed}": (0.05, 0.3, 20, seed) for seed in range(10)})
    counts = sorted({batches for _low, _high, batches, _seed in jobs.values()})

    def fill(batches: int) -> Path:
        fill_spool(root / f"filled-{batches}", batches, SPANS // batches)
        return root / f"filled-{batches}"

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        # One spool filled per batch count, and each run replays a copy of its own: the runs' spools were
        # alike anyway (3000 spans in that many batches), and filling one cost a process encoding them.
        filled = dict(zip(counts, pool.map(fill, counts), strict=True))
        yield {
            name: pool.submit(background_run, filled[batches], root / name, low, high, seed)
            for name, (low, high, batches, seed) in jobs.items()
        }


@pytest.mark.parametrize("band", sorted(BANDS, reverse=True))
def test_background_replay_sends_no_span_twice_through_a_late_collector(
    background_runs: dict[str, Future[Run]], band: str
) -> None:
    """Replaying 3000 spooled spans through a collector that keeps each request and answers it late
    delivers each span exactly once, and leaves the spool empty."""
    # The 50-300 ms band (20 batches, seed 1) is run, with these same checks, by the ten-runs test below.
    received, dups, stats, left = background_runs[band].result()
    assert dups == 0
    assert received == SPANS
    assert stats.get("spool_replayed_spans") == SPANS
    assert_books_balance(stats, ended=0)  # the replayer ended no span of its own
    assert left == 0


@pytest.mark.slow
def test_background_replay_is_exactly_once_in_ten_runs(background_runs: dict[str, Future[Run]]) -> None:
    """Ten runs of 3000 spooled spans through a 50-300 ms collector, side by side: in each, every span once
    (none twice), the replayer's books balance, and the spool is left empty."""
    found = []
    for seed in range(10):
        received, dups, stats, left = background_runs[f"ten-{seed}"].result()
        assert_books_balance(stats, ended=0)  # the replayer ended no span of its own
        found.append((received, dups, stats.get("spool_replayed_spans"), left))
    assert found == [(SPANS, 0, SPANS, 0)] * 10


def test_a_request_unanswered_within_its_whole_timeout_is_kept_and_counted_uncertain(
    tmp_path: Path,
) -> None:
    """A replayed request the collector kept but did not answer within its full timeout is the one edge
    of exactly-once: it stays in the spool (sent again later: at least once) and is counted uncertain."""
    from ctxprop import _stats
    from ctxprop._devtools.spool_cli import make_sender

    spool_dir = tmp_path / "spool"
    fill_spool(spool_dir, 2, 5)
    with late_answering_receiver(2.0, 2.0) as rx:
        spool = Spool.open(spool_dir)
        sent = spool.replay(make_sender(rx.endpoint), float("inf"), timeout=0.3)
        assert rx.wait_for_spans(5, 10)
    assert sent == 0
    assert _stats.snapshot().get("spool_uncertain_spans") == 5
    assert spool.status().spans == 10


def test_a_request_cut_short_by_the_callers_deadline_is_counted_uncertain(tmp_path: Path) -> None:
    """With a hard deadline (close(), the CLI) a replayed request the deadline cuts short is UNCERTAIN
    as well: kept for later and counted, never silently resent as a plain failure."""
    from ctxprop import _stats
    from ctxprop._devtools.spool_cli import make_sender

    spool_dir = tmp_path / "spool"
    fill_spool(spool_dir, 1, 4)
    with late_answering_receiver(2.0, 2.0) as rx:
        spool = Spool.open(spool_dir)
        sent = spool.replay(make_sender(rx.endpoint), time.monotonic() + 0.3)
        assert rx.wait_for_spans(4, 10)
    assert sent == 0
    assert _stats.snapshot().get("spool_uncertain_spans") == 4
    assert spool.status().spans == 4
