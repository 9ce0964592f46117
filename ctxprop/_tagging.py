"""Scope tags become attributes of every span started while the scopes are active."""

from __future__ import annotations

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from ctxprop import _stats
from ctxprop._scopes import active_tags

__all__ = ["ScopeTagSpanProcessor", "tag_span"]


def tag_span(span: Span) -> None:
    """Copy the active scopes' tags onto a span that is starting (never raises: a failure is counted)."""
    tags = active_tags()
    if not tags:
        return
    try:
        explicit = span.attributes
        if explicit:
            # Attributes given to start_span() are about this span in particular: they win over
            # the scope's tags of the same name.
            tags = {k: v for k, v in tags.items() if k not in explicit}
        span.set_attributes(tags)
    except Exception:  # noqa: BLE001 - span start is on the application's path: never raise there
        _stats.incr("tagging_errors")


class ScopeTagSpanProcessor(SpanProcessor):
    """Copies the active scopes' tags (isolation first, current overriding) onto each span at start.

    Attributes passed to ``start_span`` win over a tag of the same name.

    ``init()`` installs it; add it yourself to a ``TracerProvider`` you build by hand.

    >>> from opentelemetry.sdk.trace import TracerProvider
    >>> provider = TracerProvider()
    >>> provider.add_span_processor(ScopeTagSpanProcessor())

    .. versionadded:: 0.1.0
    """

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        tag_span(span)

    def on_end(self, span: ReadableSpan) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
