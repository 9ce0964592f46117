"""Scope tags become attributes of every span started while the scopes are active."""

from __future__ import annotations

from typing import Optional

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from ctxprop._scopes import active_tags

__all__ = ["ScopeTagSpanProcessor"]


class ScopeTagSpanProcessor(SpanProcessor):
    """Copies the active scopes' tags (isolation first, current overriding) onto each span at start.

    ``init()`` installs it; add it yourself to a ``TracerProvider`` you build by hand.

    >>> from opentelemetry.sdk.trace import TracerProvider
    >>> provider = TracerProvider()
    >>> provider.add_span_processor(ScopeTagSpanProcessor())

    .. versionadded:: 0.1.0
    """

    def on_start(self, span: Span, parent_context: Optional[Context] = None) -> None:
        tags = active_tags()
        if tags:
            span.set_attributes(tags)

    def on_end(self, span: ReadableSpan) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
