"""OpenTelemetry's per-event warnings do not flood stderr: one line per process, the rest counted."""

from __future__ import annotations

from support import assert_books_balance, run_child


def test_a_span_with_100k_attributes_prints_at_most_one_line_and_counts_the_rest() -> None:
    """100,000 attributes on a span (and more on a second span) print at most one "Attributes dict is
    full" line; every dropped attribute is counted, and the span still says how many it dropped."""
    result = run_child(
        """
import json, ctxprop
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exporter = InMemorySpanExporter()
ctxprop.init(exporter=exporter, handle_signals=False)
tracer = trace.get_tracer("t")
for name in ("first", "second"):
    with tracer.start_as_current_span(name) as span:
        for i in range(100_000):
            span.set_attribute(f"k{i}", i)
ctxprop.close()
spans = exporter.get_finished_spans()
print(json.dumps({"dropped": [s.dropped_attributes for s in spans], "stats": ctxprop.stats()}))
"""
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Attributes dict is full") <= 1
    assert result.last("dropped") == [99_872, 99_872]
    assert result.last("stats").get("span_attributes_dropped") == 2 * 99_872
    assert_books_balance(result.last("stats"), ended=2)
