"""Shared fixtures: every test starts with no pipeline, no global provider, zeroed counters and a spool
directory of its own."""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctxprop import _pipeline, _scopes, _stats

#: A free-threaded CPython crashes when one thread reads the frames of another that ``sys._current_frames()``
#: returned (python/cpython#152355: a use-after-free). Dask's statistical profiler does exactly that, every
#: 10 ms, in every scheduler and worker process, so on these builds it is switched off for the whole run,
#: child processes included (they inherit the environment). ctxprop itself never reads another thread's
#: frames. The README says the same to users.
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
if FREE_THREADED:
    os.environ["DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"] = "False"
    if "dask.config" in sys.modules:  # imported before this file: read the environment again
        sys.modules["dask.config"].refresh()


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


@pytest.fixture(autouse=True)
def _clean_scopes() -> Iterator[None]:
    """Each test starts with no scope in the main thread's context, whatever ran before it."""
    tokens = _scopes.ISOLATION.set(_scopes.NO_SCOPE), _scopes.CURRENT.set(_scopes.NO_SCOPE)
    yield
    _scopes.CURRENT.reset(tokens[1])
    _scopes.ISOLATION.reset(tokens[0])
