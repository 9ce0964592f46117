"""The ``opentelemetry_instrumentor`` entry point, kept apart from ``_instrument`` so that ``import ctxprop``
does not import ``opentelemetry.instrumentation`` (tens of milliseconds) for users who never run
``opentelemetry-instrument``."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from ctxprop._instrument import instrument, uninstrument

__all__ = ["CtxpropInstrumentor"]


class _FallbackInstrumentor:
    """The parts of ``BaseInstrumentor`` used here, when opentelemetry-instrumentation is absent."""

    def instrument(self, **kwargs: Any) -> None:
        self._instrument(**kwargs)

    def uninstrument(self, **kwargs: Any) -> None:
        self._uninstrument(**kwargs)

    def _instrument(self, **kwargs: Any) -> None:
        raise NotImplementedError

    def _uninstrument(self, **kwargs: Any) -> None:
        raise NotImplementedError


def _instrumentor_base() -> Any:
    # Looked up at run time: mypy does not see BaseInstrumentor in opentelemetry-instrumentation 0.66b1,
    # and ctxprop does not depend on that package (only opentelemetry-instrument loads this class).
    try:
        from opentelemetry.instrumentation import instrumentor

        return getattr(instrumentor, "BaseInstrumentor", _FallbackInstrumentor)
    except ImportError:  # pragma: no cover
        return _FallbackInstrumentor


_Base: Any = _instrumentor_base()


class CtxpropInstrumentor(_Base):  # type: ignore[misc]
    """The ``opentelemetry_instrumentor`` entry point: ``opentelemetry-instrument python app.py`` calls
    :func:`instrument` before the application starts, and gives the provider that the stock configurator
    built ctxprop's scope tags and a flush at SIGTERM and exit (``OTEL_PYTHON_CONFIGURATOR=ctxprop`` for
    ctxprop's whole pipeline instead).

    >>> CtxpropInstrumentor().instrument()
    >>> CtxpropInstrumentor().uninstrument()

    .. versionadded:: 0.1.0
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        instrument()
        # Without OTEL_PYTHON_CONFIGURATOR=ctxprop, the stock configurator built the provider (instrumentors
        # load after configurators): its spans still get the scope tags, and are flushed at SIGTERM and
        # exit. ctxprop's own pipeline (spool, bounded endings, retries) needs the configurator.
        from opentelemetry import trace

        from ctxprop import _pipeline

        _pipeline.adopt(trace.get_tracer_provider())

    def _uninstrument(self, **kwargs: Any) -> None:
        uninstrument()
