"""The ``opentelemetry_configurator`` entry point ``ctxprop``: zero-code users get ctxprop's whole pipeline.

``OTEL_PYTHON_CONFIGURATOR=ctxprop opentelemetry-instrument python app.py`` (or ``... uvicorn app:app``)
runs :class:`CtxpropConfigurator` before the application starts. It does what the SDK's own configurator
does (the provider's sampler, id generator and resource from the ``OTEL_*`` variables; metrics and logs
exactly as stock), except for the trace exporter named ``otlp`` (the default): instead of a stock
``BatchSpanProcessor``, the spans go through ctxprop's pipeline as ``init()`` sets it up from the same
variables (endpoint, headers, compression, batch sizes, timeouts): scope tags as span attributes, the
spool, delivery at SIGTERM, Ctrl-C, exit and fork. Other trace exporters named in
``OTEL_TRACES_EXPORTER`` (``console``, ...) are left to the SDK, as without ctxprop.

The SDK's configurator base class is private to opentelemetry-sdk (``_OTelSDKConfigurator``; the distro's
``OpenTelemetryConfigurator`` subclasses it the same way). Only its ``configure(**kwargs)`` entry is used,
and the provider it built is read back through the public ``trace.get_tracer_provider()``; ctxprop's
processors are added with the public ``add_span_processor``. Kept apart from ``_pipeline`` so that
``import ctxprop`` never imports the SDK's configuration module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.environment_variables import OTEL_TRACES_EXPORTER
from opentelemetry.sdk.trace import TracerProvider

__all__ = ["CtxpropConfigurator"]

# The trace exporter names ctxprop's own OTLP/HTTP sender stands in for.
_OURS = frozenset({"otlp", "otlp_proto_http"})


def _sdk_configurator() -> Any:
    # Looked up at run time: the module is private to opentelemetry-sdk, and mypy has no stubs for it.
    from opentelemetry.sdk import _configuration

    return _configuration._OTelSDKConfigurator


def split_trace_exporters(value: str | None) -> tuple[bool, list[str]]:
    """Whether ctxprop's sender exports (``otlp``, the default when unset), and the other names left to
    the SDK.

    >>> split_trace_exporters(None)
    (True, [])
    >>> split_trace_exporters("console, otlp")
    (True, ['console'])
    >>> split_trace_exporters("none")
    (False, [])
    """
    if value is None or not value.strip():
        return True, []
    names = [n.strip() for n in value.split(",") if n.strip()]
    if [n.lower() for n in names] == ["none"]:
        return False, []
    return any(n in _OURS for n in names), [n for n in names if n not in _OURS]


@contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    # For the length of the SDK's own configure() call only (startup, before the application's threads):
    # a child process started later sees the variable as the user set it.
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _picked_by_chance() -> bool:
    """No configurator named, and another one installed besides ctxprop's."""
    if os.environ.get("OTEL_PYTHON_CONFIGURATOR"):
        return False
    from importlib.metadata import entry_points

    return any(ep.name != "ctxprop" for ep in entry_points(group="opentelemetry_configurator"))


class CtxpropConfigurator(_sdk_configurator()):  # type: ignore[misc]
    """``OTEL_PYTHON_CONFIGURATOR=ctxprop``: the SDK's configurator, with ctxprop's pipeline for traces.

    .. versionadded:: 0.1.0
    """

    def _configure(self, **kwargs: Any) -> None:
        ours, others = split_trace_exporters(os.environ.get(OTEL_TRACES_EXPORTER))
        if os.environ.get("OTEL_CONFIG_FILE") or _picked_by_chance():
            # A declarative configuration file describes the processors itself: it decides. And
            # opentelemetry-instrument loads the first configurator installed when none is named, so
            # with another one installed (the distro's) ctxprop's would be picked or not by install
            # order: then it does just what the stock one does, and the instrumentor adds the tags.
            super()._configure(**kwargs)
            return
        with _environ(OTEL_TRACES_EXPORTER, ",".join(others) or "none"):
            super()._configure(**kwargs)
        if not ours:
            return
        from ctxprop import _pipeline

        provider = trace.get_tracer_provider()
        if isinstance(provider, TracerProvider):
            _pipeline.attach(provider)
        else:  # not the SDK's provider (another SDK set one first): ctxprop's own, with its warning
            _pipeline.init()
