"""Sentry adapter (``pip install ctxprop[sentry]``): Sentry's scopes travel with every ctxprop capture.

Sentry keeps its isolation and current scopes in two ContextVars, and mutates a scope in place. A plain
context copy would therefore hand a task the submitter's very scope objects: what the task sets (a tag, a
user, a breadcrumb) would land in the submitter's scope, and what the submitter sets after submitting
would reach the task. So, when enabled, every :func:`ctxprop.capture` (and so every
``ContextAwareThreadPoolExecutor`` task, ``run_in_executor_with_context`` call, ``wrap`` and ``@worker``)
forks both Sentry scopes at capture time, and every run of the snapshot enters its own fork of them
(each ``@worker`` call, which runs in its caller's context, enters Sentry's own ``isolation_scope()``).

How it gets enabled (only then does capture pay anything; never is a Sentry fork done otherwise):

- add the integration: ``sentry_sdk.init(dsn=..., integrations=[CtxpropIntegration()])``; or
- call ``ctxprop.init()`` after ``sentry_sdk.init()``: :func:`auto_enable` turns it on when Sentry is
  already initialised; or
- call :func:`enable` yourself.

Process pools (``ContextAwareProcessPoolExecutor``, ``run_in_executor_with_context`` or
``bind_for_process`` with any ``ProcessPoolExecutor``, and plain pools under ``ctxprop.instrument()``): a
Scope cannot cross a process, so each task carries plain data read from the submitter's isolation and
current scopes at submit time (tags, user, contexts, extras, level, fingerprint, transaction name,
breadcrumbs; values that do not pickle are dropped and counted). If Sentry is initialised in the worker
(by the pool's initializer, or inherited through fork), the task runs in forks of the worker's scopes with
that data merged in as Sentry merges scopes, so its events carry it and nothing it sets reaches the next
task. Without Sentry initialised in the worker, the data is ignored.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import threading
from collections.abc import Callable
from typing import Any

import sentry_sdk
import sentry_sdk.scope as _sentry_scope
from sentry_sdk.integrations import Integration

from ctxprop import _capture, _stats

__all__ = [
    "CtxpropIntegration",
    "SentryScopesHook",
    "activate_portable",
    "auto_enable",
    "disable",
    "enable",
    "enabled",
]

_State = tuple[Any | None, Any | None]


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

    def scoped(self) -> contextlib.AbstractContextManager[Any]:
        # Sentry's own fork of both scopes for a block, restored after it (each @worker call).
        return sentry_sdk.isolation_scope()

    def capture_portable(self) -> bytes | None:
        iso = _scope_data(_sentry_scope._isolation_scope.get(), 0)
        cur = _scope_data(_sentry_scope._current_scope.get(), 1)
        if not iso and not cur:
            return None
        pid = os.getpid()
        try:
            return pickle.dumps((pid, iso, cur), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001, S110 - some value does not pickle: the slow path drops it
            pass
        try:
            return pickle.dumps((pid, _picklable(iso), _picklable(cur)), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 - the submit must never fail because of Sentry state
            _stats.incr("sentry_adapter_errors")
            return None

    def portable_activator(self) -> Callable[[bytes], None]:
        return activate_portable

    def enter_worker(self) -> None:
        # A forked pool worker starts with copies of the scopes of the thread that started it: stale for
        # every later task, which gets the submitter's own data instead. Fresh ones for the worker. A
        # process that imported this module itself (spawn) inherited nothing: what its initializer set
        # stays.
        if os.getpid() == _IMPORT_PID:
            return
        if _sentry_scope._isolation_scope.get() is not None:
            _sentry_scope._isolation_scope.set(None)
        if _sentry_scope._current_scope.get() is not None:
            _sentry_scope._current_scope.set(None)


# Scope attributes carried to process-pool workers. Sentry has no public getters for them; read
# defensively (a missing one is skipped), so a Sentry release that renames one loses that field only.
_SCALARS = ("_level", "_fingerprint", "_transaction", "_user")
_MAPPINGS = ("_tags", "_contexts", "_extras", "_transaction_info")
_BREADCRUMBS = "_breadcrumbs"


def _scope_data(scope: Any, slot: int) -> dict[str, Any]:
    """The non-empty carried fields of ``scope``, by reference (pickled at once, so never copied); the
    breadcrumbs already pickled, through the cache ``slot`` (0: isolation scope, 1: current scope)."""
    data: dict[str, Any] = {}
    if scope is None:
        return data
    for name in (*_SCALARS, *_MAPPINGS):
        value = getattr(scope, name, None)
        if value:
            data[name] = value
    crumbs = getattr(scope, _BREADCRUMBS, None)
    if crumbs:
        data[_BREADCRUMBS] = _crumbs_blob(crumbs, slot)
    return data


# Per slot: (deque, length, first crumb, last crumb, pickled crumbs). Breadcrumbs are most of the state
# (up to max_breadcrumbs, 100 by default, each with a datetime that pickles slowly: ~100 us for 100), and
# a batch of submits from one scope sees the same ones. Sentry only appends new crumb dicts and pops old
# ones, so the same deque object with the same length, first and last crumb (held here, so identity is
# exact) holds the same crumbs. The tuples are replaced whole: no lock on the submit path.
_crumb_cache: list[tuple[Any, int, Any, Any, bytes]] = [
    (None, 0, None, None, b""),
    (None, 0, None, None, b""),
]


def _crumbs_blob(crumbs: Any, slot: int) -> bytes:
    cached_deque, length, first, last, blob = _crumb_cache[slot]
    if cached_deque is crumbs and length == len(crumbs) and first is crumbs[0] and last is crumbs[-1]:
        return blob
    items = list(crumbs)
    try:
        blob = pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - some crumb does not pickle: leave that one out (the rare path)
        blob = pickle.dumps([c for c in items if _pickles(c)], protocol=pickle.HIGHEST_PROTOCOL)
    if items:
        _crumb_cache[slot] = (crumbs, len(items), items[0], items[-1], blob)
    return blob


def _pickles(value: Any) -> bool:
    try:
        pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - whatever pickling raises, the value stays home
        _stats.incr("sentry_values_dropped")
        return False
    return True


def _picklable(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without the values that do not pickle, per key of a mapping (breadcrumbs are sorted out
    when pickled, in ``_crumbs_blob``)."""
    out: dict[str, Any] = {}
    for name, value in data.items():
        if name in _MAPPINGS and isinstance(value, dict):
            out[name] = {k: v for k, v in value.items() if _pickles((k, v))}
        elif _pickles(value):
            out[name] = value
    return out


def _apply(scope: Any, data: dict[str, Any]) -> None:
    """Merge carried fields into a fresh fork, as Sentry's ``Scope.update_from_scope`` merges scopes."""
    for name, value in data.items():
        if name in _SCALARS:
            setattr(scope, name, value)
        elif name in _MAPPINGS:
            getattr(scope, name).update(value)  # the fork's own copy of the dict
        elif name == _BREADCRUMBS:
            crumbs = scope._breadcrumbs
            crumbs.extend(pickle.loads(value))  # noqa: S301 - bytes made by ctxprop in the submitting process
            client = scope.get_client()
            limit = client.options.get("max_breadcrumbs", 100) if client.is_active() else 100
            while len(crumbs) > limit:
                crumbs.popleft()


def activate_portable(state: bytes) -> None:
    """In a process-pool worker, inside the task's own context: enter forks of the worker's Sentry scopes
    with the submitter's data merged in. Does nothing where Sentry is not initialised.

    .. versionadded:: 0.1.0
    """
    if not sentry_sdk.is_initialized():
        return
    pid, iso_data, cur_data = pickle.loads(state)  # noqa: S301 - bytes ctxprop made in the submitting process
    # get_*_scope() makes (and sets, in this discarded context copy) a scope where the worker had none.
    iso = _sentry_scope.Scope.get_isolation_scope().fork()
    cur = _sentry_scope.Scope.get_current_scope().fork()
    if pid != os.getpid():
        # In the submitting process itself (a bound task called directly) the scopes already hold the
        # data: forking is all the isolation needed, and merging would repeat every breadcrumb.
        _apply(iso, iso_data)
        _apply(cur, cur_data)
    _sentry_scope._isolation_scope.set(iso)
    _sentry_scope._current_scope.set(cur)


_HOOK = SentryScopesHook()
_IMPORT_PID = os.getpid()
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
