"""The ctxprop pytest plugin: a ``ctxprop_spans`` fixture to check your code's spans in your own tests.

Installed with ctxprop (entry point ``pytest11``), so it is loaded in every pytest run; it sets nothing up
until a test asks for the fixture (disable it with ``-p no:ctxprop``).

.. code-block:: python

    def test_report_job(ctxprop_spans):
        run_report_job()          # your code: spans in worker threads, asyncio, ...
        ctxprop_spans.assert_no_orphans("report")
        ctxprop_spans.assert_parent("render page", "report")
        ctxprop_spans.assert_tags("render page", tenant="acme")

.. versionadded:: 0.1.0
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

__all__ = ["SpanCapture", "ctxprop_spans"]


def _describe(span: ReadableSpan) -> str:
    ctx = span.context
    sid = format(ctx.span_id, "016x") if ctx is not None else "?"
    return f"{span.name!r} (span {sid})"


class _Rendered:
    """A ReadableSpan seen through the fields ``ctxprop._devtools.tree`` draws."""

    __slots__ = (
        "attributes",
        "end_ns",
        "name",
        "parent_span_id",
        "service_name",
        "span_id",
        "start_ns",
        "status_code",
        "status_message",
        "trace_id",
    )

    def __init__(self, span: ReadableSpan) -> None:
        ctx = span.context
        self.trace_id = format(ctx.trace_id, "032x") if ctx is not None else "?"
        self.span_id = format(ctx.span_id, "016x") if ctx is not None else "?"
        self.parent_span_id = format(span.parent.span_id, "016x") if span.parent is not None else None
        self.name = span.name
        self.start_ns = span.start_time or 0
        self.end_ns = span.end_time or self.start_ns
        self.attributes = dict(span.attributes or {})
        self.status_code = int(span.status.status_code.value)
        self.status_message = span.status.description or ""
        service = span.resource.attributes.get("service.name")
        self.service_name = service if isinstance(service, str) else None


class SpanCapture:
    """The spans the code under test ended, with assertions about how they hang together.

    Got from the ``ctxprop_spans`` fixture. Spans are captured as they end, in whatever thread.

    .. versionadded:: 0.1.0
    """

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        self._exporter = exporter

    @property
    def spans(self) -> list[ReadableSpan]:
        """Every span ended so far in this test, in the order they ended."""
        return list(self._exporter.get_finished_spans())

    def by_name(self, name: str) -> list[ReadableSpan]:
        """The spans called ``name``."""
        return [s for s in self.spans if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        """The single span called ``name``; fails if there are none or several."""
        __tracebackhide__ = True  # pytest shows the test's line, not the plugin's
        found = self.by_name(name)
        if len(found) != 1:
            raise AssertionError(f"expected exactly one span {name!r}, found {len(found)}{self._names()}")
        return found[0]

    def tree(self, *, attributes: bool = False) -> str:
        """The captured spans drawn as trace trees (what the assertion messages show), for a print()."""
        from ctxprop._devtools.tree import render_forest

        lines = render_forest([_Rendered(s) for s in self.spans], attributes=attributes, show_service=False)
        return "\n".join(lines) if lines else "(no spans)"

    def _fail(self, message: str) -> NoReturn:
        __tracebackhide__ = True  # pytest shows the test's line, not the plugin's
        raise AssertionError(f"{message}\ncaptured spans:\n{self.tree(attributes=True)}")

    def clear(self) -> None:
        """Forget the spans captured so far."""
        self._exporter.clear()

    def _names(self, spans: Sequence[ReadableSpan] | None = None) -> str:
        spans = self.spans if spans is None else spans
        names = sorted({s.name for s in spans})
        return f"; spans captured: {', '.join(repr(n) for n in names) or 'none'}"

    def _named(self, name: str, spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
        __tracebackhide__ = True  # pytest shows the test's line, not the plugin's
        found = [s for s in spans if s.name == name]
        if not found:
            raise AssertionError(f"no span named {name!r}{self._names(spans)}")
        return found

    def assert_no_orphans(self, *roots: str) -> None:
        """Every span's parent was captured too, except for spans named in ``roots``.

        A span started on a thread that did not get the caller's context becomes a root of its own trace,
        so name every span that is meant to be a root: anything else without a captured parent fails.
        """
        __tracebackhide__ = True  # pytest shows the test's line, not the plugin's
        spans = self.spans
        ids = {(s.context.trace_id, s.context.span_id) for s in spans if s.context is not None}
        problems = []
        for s in spans:
            parent = s.parent
            if s.name in roots:
                continue
            if parent is None:
                problems.append(f"{_describe(s)} has no parent: it started without its caller's context")
            elif (parent.trace_id, parent.span_id) not in ids:
                problems.append(f"{_describe(s)} has parent {parent.span_id:016x}, which was not captured")
        if problems:
            named = ", ".join(repr(r) for r in roots) or "none"
            head = f"{len(problems)} orphaned span(s) (roots allowed: {named}):"
            self._fail(head + "\n  " + "\n  ".join(problems))

    def assert_parent(self, child_name: str, parent_name: str) -> None:
        """Every span called ``child_name`` is a direct child of a span called ``parent_name``."""
        __tracebackhide__ = True  # pytest shows the test's line, not the plugin's
        spans = self.spans
        by_id = {s.context.span_id: s for s in spans if s.context is not None}
        self._named(parent_name, spans)
        problems = []
        for child in self._named(child_name, spans):
            parent = child.parent
            if parent is None:
                problems.append(f"{_describe(child)} has no parent")
                continue
            actual = by_id.get(parent.span_id)
            if actual is None:
                problems.append(f"{_describe(child)} has parent {parent.span_id:016x}, not captured")
            elif actual.name != parent_name:
                problems.append(f"{_describe(child)} has parent {_describe(actual)}")
        if problems:
            head = f"expected every {child_name!r} span under a {parent_name!r} span:"
            self._fail(head + "\n  " + "\n  ".join(problems))

    def assert_tags(self, span_name: str, **tags: Any) -> None:
        """Every span called ``span_name`` has these attributes with these values (scope tags land there).

        Sequence values compare equal whether given as a list or a tuple.
        """
        __tracebackhide__ = True  # pytest shows the test's line, not the plugin's
        problems = []
        for s in self._named(span_name, self.spans):
            attrs = dict(s.attributes or {})
            for key, want in tags.items():
                have = attrs.get(key, _MISSING)
                if have is _MISSING:
                    problems.append(f"{_describe(s)} lacks tag {key!r} (has {attrs!r})")
                elif _comparable(have) != _comparable(want):
                    problems.append(f"{_describe(s)} has {key}={have!r}, expected {want!r}")
        if problems:
            self._fail("tag mismatch:\n  " + "\n  ".join(problems))


_MISSING = object()


def _comparable(value: Any) -> Any:
    # OTel stores sequence attributes as tuples; a test naturally writes lists.
    return tuple(value) if isinstance(value, list) else value


class _Forward:
    """Hands each ended span to the capture of the test running now, if any.

    Added once to each global provider the fixture meets (as a span processor) and left there: tracers
    bind to a provider for good (a module-level ``tracer = trace.get_tracer(...)`` keeps the first one it
    resolved), so a later test must still see the spans of that provider, not only of its own.
    """

    target: InMemorySpanExporter | None = None

    @classmethod
    def processor(cls) -> Any:
        # Built on first use: loading the plugin, as every pytest run does, imports no SDK class.
        from opentelemetry.sdk.trace import SpanProcessor

        class ForwardingProcessor(SpanProcessor):
            def on_end(self, span: ReadableSpan) -> None:
                target = cls.target
                if target is not None:
                    target.export((span,))

        return ForwardingProcessor()


def _attach() -> Any:
    """Forward the global provider's spans to the fixture; returns the provider if it had to make one."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    import ctxprop

    provider = trace.get_tracer_provider()
    created = None
    if not isinstance(provider, TracerProvider):

        class Discard(SpanExporter):
            # The spans the fixture needs come through the forwarding processor.
            def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        # No SDK provider yet (the usual case in a test run): ctxprop's pipeline, exporting nowhere. No
        # signal handlers: the test process's own SIGTERM/SIGINT behaviour is pytest's business.
        provider = created = ctxprop.init(exporter=Discard(), service_name="pytest", handle_signals=False)
    if not getattr(provider, "_ctxprop_pytest_forward", False):
        provider.add_span_processor(_Forward.processor())
        provider._ctxprop_pytest_forward = True  # type: ignore[attr-defined]
    return created


@pytest.fixture
def ctxprop_spans() -> Iterator[SpanCapture]:
    """Capture the spans this test's code ends, in memory, and check how they hang together.

    Uses the global TracerProvider: the application's own (``ctxprop.init()`` called in a conftest; it is
    left as it is) or, when there is none, a ctxprop pipeline for the test, closed after it. Every provider
    the fixture saw keeps forwarding to the running test, so tracers made at import time (bound to the
    first provider for good) are captured in every test. Spans ended outside the test are not captured,
    and no span of one test is seen by another.

    .. versionadded:: 0.1.0
    """
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from ctxprop import _pipeline

    created = _attach()
    exporter = InMemorySpanExporter()
    _Forward.target = exporter
    try:
        yield SpanCapture(exporter)
    finally:
        _Forward.target = None
        if created is not None and _pipeline.current_provider() is created:
            # A pipeline of the fixture's own goes, so that code in a later test can call ctxprop.init()
            # with its own settings. Tracers already bound to it keep working: its spans still pass
            # through the forwarding processor, which stays on it.
            _pipeline.close()
