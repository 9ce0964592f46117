"""Trace context and scope tags for child processes, through their environment.

The parent writes ``TRACEPARENT``, ``TRACESTATE`` and ``BAGGAGE`` (the OpenTelemetry environment-carrier
names, injected with the global propagator) and ``CTXPROP_TAGS``, a JSON object
``{"isolation": {...}, "current": {...}}`` of the scopes' tags. A Python child that calls
``ctxprop.init()`` continues the trace (``init()`` ends with :func:`adopt_environment`); any other
program can read the same variables (``TRACEPARENT`` is the W3C ``traceparent`` header value).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate

from ctxprop import _stats
from ctxprop._capture import scope_tags
from ctxprop._scopes import get_current_scope, get_isolation_scope

__all__ = ["TAGS_ENV", "adopt_environment", "popen_with_context", "run_subprocess", "subprocess_env"]

#: The environment variable holding the scopes' tags as JSON.
TAGS_ENV = "CTXPROP_TAGS"
# carrier key (as propagators write it) -> environment variable
_CARRIER_ENV = {"traceparent": "TRACEPARENT", "tracestate": "TRACESTATE", "baggage": "BAGGAGE"}


def subprocess_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default ``os.environ``) that carries the current trace context and scope tags.

    Pass it as a child's ``env=``; a child that calls ``ctxprop.init()`` continues the trace (its spans
    are children of the span current here) and starts with these tags on its scopes.

    >>> import subprocess, sys
    >>> out = subprocess.run([sys.executable, "-c", "import os; print('TRACEPARENT' in os.environ)"],
    ...                      env=subprocess_env(), capture_output=True, text=True).stdout  # doctest: +SKIP

    .. versionadded:: 0.1.0
    """
    result = dict(os.environ if env is None else env)
    carrier: dict[str, str] = {}
    try:
        propagate.inject(carrier)
    except Exception:  # noqa: BLE001 - a faulty custom propagator must not stop the child from starting
        _stats.incr("propagation_errors")
    if carrier.get("traceparent"):
        # A context to pass on replaces whatever this process was itself given, entirely: a TRACESTATE
        # left over from an older trace must not ride along with the new TRACEPARENT.
        for stale in _CARRIER_ENV.values():
            result.pop(stale, None)
    for key, value in carrier.items():
        name = _CARRIER_ENV.get(key.lower())
        if name is not None and value:
            result[name] = value
    iso, cur = scope_tags()
    if iso or cur:
        result[TAGS_ENV] = json.dumps({"isolation": iso, "current": cur}, separators=(",", ":"))
    else:
        result.pop(TAGS_ENV, None)
    return result


def _restore_tags(raw: str) -> None:
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise TypeError("CTXPROP_TAGS is not a JSON object")
    for scope, key in ((get_isolation_scope(), "isolation"), (get_current_scope(), "current")):
        tags = data.get(key) or {}
        if isinstance(tags, dict):
            for name, value in tags.items():
                scope.set_tag(name, value)  # invalid values are skipped and counted there


def adopt_environment(environ: Mapping[str, str] | None = None) -> None:
    """Continue the trace and restore the tags a parent passed with :func:`subprocess_env`.

    ``init()`` calls it: it attaches the extracted context in the calling thread's context (so spans
    started afterwards are children of the parent's span) and sets the tags on the active scopes. Never
    raises; malformed variables are ignored and counted (``stats()["adopt_errors"]``).

    .. versionadded:: 0.1.0
    """
    env = os.environ if environ is None else environ
    carrier: dict[str, str] = {key: env[name] for key, name in _CARRIER_ENV.items() if env.get(name)}
    if carrier:
        try:
            otel_context.attach(propagate.extract(carrier))
        except Exception:  # noqa: BLE001 - a malformed variable must not break init()
            _stats.incr("adopt_errors")
    raw = env.get(TAGS_ENV)
    if raw:
        try:
            _restore_tags(raw)
        except Exception:  # noqa: BLE001 - same: bad tags are skipped, the child still runs
            _stats.incr("adopt_errors")


def _with_env(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs["env"] = subprocess_env(kwargs.get("env"))
    return kwargs


def run_subprocess(args: Any, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run(args, **kwargs)`` with ``env=subprocess_env(env)``; every keyword passes through.

    >>> import sys
    >>> run_subprocess([sys.executable, "-c", "pass"], check=True).returncode
    0

    .. versionadded:: 0.1.0
    """
    return subprocess.run(args, **_with_env(kwargs))  # noqa: PLW1510, S603 - the caller decides check/args


def popen_with_context(args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(args, **kwargs)`` with ``env=subprocess_env(env)``; every keyword passes through.

    .. versionadded:: 0.1.0
    """
    return subprocess.Popen(args, **_with_env(kwargs))  # noqa: S603 - the caller's own command
