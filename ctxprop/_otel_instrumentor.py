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
    :func:`instrument` before the application starts.

    >>> CtxpropInstrumentor().instrument()
    >>> CtxpropInstrumentor().uninstrument()

    .. versionadded:: 0.1.0
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        instrument()

    def _uninstrument(self, **kwargs: Any) -> None:
        uninstrument()
