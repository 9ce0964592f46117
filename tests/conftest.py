"""Shared fixtures: every test starts with no pipeline, no global provider, zeroed counters and a spool
directory of its own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ctxprop import _pipeline, _stats


@pytest.fixture(autouse=True)
def _reset_ctxprop_globals() -> Iterator[None]:
    """Reset ctxprop's process-wide state before and after each test."""
    _pipeline._reset_for_tests()
    _stats.reset()
    yield
    _pipeline._reset_for_tests()
    _stats.reset()


@pytest.fixture(autouse=True)
def _private_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test (and the child processes it starts) gets its own spool directory, so no test replays
    spans another test left behind, and the user's real spool is never touched."""
    monkeypatch.setenv("CTXPROP_SPOOL_DIR", str(tmp_path / "ctxprop-spool"))
