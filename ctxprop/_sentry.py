"""Sentry adapter (``pip install ctxprop[sentry]``): Sentry's scopes travel with every ctxprop capture.

Sentry keeps its isolation and current scopes in two ContextVars, and mutates a scope in place. A plain
context copy would therefore hand a task the submitter's very scope objects: what the task sets (a tag, a
user, a breadcrumb) would land in the submitter's scope, and what the submitter sets after submitting
would reach the task. So, when enabled, every :func:`ctxprop.capture` (and so every
``ContextAwareThreadPoolExecutor`` task, ``run_in_executor_with_context`` call, ``wrap`` and ``@worker``)
forks both Sentry scopes at capture time, and every run of the snapshot enters its own fork of them.

How it gets enabled (only then does capture pay anything; never is a Sentry fork done otherwise):

- add the integration: ``sentry_sdk.init(dsn=..., integrations=[CtxpropIntegration()])``; or
- call ``ctxprop.init()`` after ``sentry_sdk.init()``: :func:`auto_enable` turns it on when Sentry is
  already initialised; or
- call :func:`enable` yourself.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Optional

import sentry_sdk.scope as _sentry_scope
from sentry_sdk.integrations import Integration

from ctxprop import _capture

__all__ = ["CtxpropIntegration", "SentryScopesHook", "auto_enable", "disable", "enable", "enabled"]

_State = tuple[Optional[Any], Optional[Any]]


class SentryScopesHook:
    """Forks Sentry's isolation and current scopes at capture; enters a private fork of them per run."""

    def capture(self) -> _State:
        iso = _sentry_scope._isolation_scope.get()
        cur = _sentry_scope._current_scope.get()
        # Fork now, not at run time: the task must see the scopes as they were when it was submitted.
        return (
            iso.fork() if iso is not None else None,
            cur.fork() if cur is not None else None,
        )

    def activate(self, state: _State) -> None:
        iso, cur = state
        # A snapshot may run many times (wrap()); each run gets its own fork so runs never share a scope.
        # Plain set(): this runs inside the task's own context copy, which is discarded afterwards.
        if iso is not None:
            _sentry_scope._isolation_scope.set(iso.fork())
        if cur is not None:
            _sentry_scope._current_scope.set(cur.fork())


_HOOK = SentryScopesHook()
_lock = threading.Lock()


def enable() -> None:
    """Carry Sentry's scopes with every ctxprop capture from now on (idempotent).

    >>> enable(); enabled()
    True
    >>> disable(); enabled()
    False

    .. versionadded:: 0.1.0
    """
    with _lock:
        _capture.register_capture_hook(_HOOK)


def disable() -> None:
    """Stop carrying Sentry's scopes (captures cost nothing extra again).

    .. versionadded:: 0.1.0
    """
    with _lock:
        _capture.unregister_capture_hook(_HOOK)


def enabled() -> bool:
    """Whether captures currently carry Sentry's scopes.

    .. versionadded:: 0.1.0
    """
    return _HOOK in _capture._hooks


def auto_enable() -> bool:
    """Enable when sentry-sdk is imported and initialised; returns whether it is enabled.

    Called by ``ctxprop.init()``; never imports sentry-sdk itself and never raises.

    .. versionadded:: 0.1.0
    """
    sdk = sys.modules.get("sentry_sdk")
    try:
        if sdk is not None and sdk.is_initialized():
            enable()
    except Exception:  # noqa: BLE001 - a Sentry fault must not break ctxprop.init()
        from ctxprop import _stats

        _stats.incr("sentry_adapter_errors")
    return enabled()


class CtxpropIntegration(Integration):
    """Sentry integration: Sentry's scopes follow ctxprop's captures into pools and ``run_in_executor``.

    >>> import sentry_sdk
    >>> from ctxprop._sentry import CtxpropIntegration
    >>> _ = sentry_sdk.init(integrations=[CtxpropIntegration()])

    .. versionadded:: 0.1.0
    """

    identifier = "ctxprop"

    @staticmethod
    def setup_once() -> None:
        enable()
