"""Shared fixtures: every test starts with no pipeline, no global provider and zeroed counters."""

from __future__ import annotations

from collections.abc import Iterator

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
